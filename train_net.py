#!/usr/bin/env python
"""Train and evaluate GFL with detectron2's DefaultTrainer and COCOEvaluator.

    python train_net.py --config-file configs/gfl_R_50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/gfl_R_50_FPN_1x.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file configs/trees/gfl_lite0_trees.yaml --num-gpus 2 MODEL.DEVICE cpu
    python train_net.py --config-file configs/gfl_R_50_FPN_1x.yaml \
        --dataset mine_train=voc:data/train_xml:data/images --dataset mine_val=coco:data/val.json \
        DATASETS.TRAIN "('mine_train',)" DATASETS.TEST "('mine_val',)" MODEL.GFL.NUM_CLASSES 3

``--dataset NAME=FORMAT:PATH[:IMAGE_ROOT]`` (coco, voc, csv; docs/own_data.md) registers your
annotations in every worker. ``SOLVER.REFERENCE_IMS_PER_BATCH`` scales BASE_LR and WARMUP_ITERS to
``SOLVER.IMS_PER_BATCH`` (linear scaling rule; gfocal/engine/batch_scaling.py).

With ``MODEL.DEVICE cpu``, ``--num-gpus N`` starts N CPU worker processes (gloo; gfocal/engine/launch.py).

Flags and trailing ``KEY VALUE`` overrides are detectron2's (``default_argument_parser``). The
trainer, setup and evaluation are in gfocal/engine/ (trainer.py, defaults.py).
"""
import logging

from detectron2.engine import default_argument_parser

import gfocal  # noqa: F401  (registers the GFL meta-architecture and backbones)
from gfocal.config import load_config
from gfocal.data.register import add_dataset_arguments, register_datasets_from_args
from gfocal.engine import Trainer, launch
from gfocal.engine.defaults import setup, train_or_evaluate

__all__ = ["Trainer", "setup", "main"]


def main(args):
    register_datasets_from_args(args)  # in every worker process
    return train_or_evaluate(setup(args), args)


if __name__ == "__main__":
    args = add_dataset_arguments(default_argument_parser()).parse_args()
    logging.getLogger(__name__).info("Command Line Args: %s", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=load_config(args.config_file, args.opts).MODEL.DEVICE,
    )
