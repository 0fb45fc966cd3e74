#!/usr/bin/env python
"""Train and evaluate GFL from a LazyConfig (Python) config, as detectron2's
tools/lazyconfig_train_net.py does, with this project's additions (GFLCheckpointer, CPU workers,
bfloat16 autocast on CPU).

    python lazyconfig_train_net.py --config-file configs/COCO-Detection/gfl_R_50_FPN_1x.py --num-gpus 8
    python lazyconfig_train_net.py --config-file configs/trees/gfl_lite0_trees.py
    python lazyconfig_train_net.py --config-file configs/trees/gfl_lite0_trees.py --eval-only \\
        train.init_checkpoint=output/trees/gfl_lite0/model_final.pth

Trailing ``key=value`` overrides are LazyConfig's (``train.max_iter=100``, ``optimizer.lr=0.01``).
Your own annotations: ``--dataset NAME=FORMAT:PATH[:IMAGE_ROOT]`` as in train_net.py, then
``dataloader.train.dataset.names=NAME dataloader.test.dataset.names=... model.num_classes=K
dataloader.train.dataset.num_classes=K`` (docs/own_data.md). ``train.reference_batch_size=16``
scales optimizer.lr and the warm-up to ``dataloader.train.total_batch_size`` (linear scaling).
``train.model_ema`` (enabled, decay, ...: the YAML's MODEL_EMA keys in lower case) averages the
weights (gfocal/engine/hooks/ema.py); evaluation is then of the averages.
With ``train.device=cpu``, ``--num-gpus N`` starts N CPU worker processes (gloo).
Training and evaluation are in gfocal/engine/lazy_trainer.py.
"""
from detectron2.engine import default_argument_parser

import gfocal  # noqa: F401  (registers the GFL meta-architecture, backbones and datasets)
from gfocal.config import load_lazy_config
from gfocal.data.register import add_dataset_arguments, register_datasets_from_args
from gfocal.engine import launch
from gfocal.engine.lazy_trainer import lazy_setup, lazy_train_or_evaluate

__all__ = ["main"]


def main(args):
    register_datasets_from_args(args)  # in every worker process
    return lazy_train_or_evaluate(lazy_setup(args), args)


if __name__ == "__main__":
    args = add_dataset_arguments(default_argument_parser()).parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=load_lazy_config(args.config_file, args.opts).train.device,
    )
