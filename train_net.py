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

Flags and trailing ``KEY VALUE`` overrides are detectron2's (``default_argument_parser``).
"""
import logging

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results

import gfocal  # noqa: F401  (registers the GFL meta-architecture and backbones)
from gfocal import add_gfl_config
from gfocal.data.register import add_dataset_arguments, check_datasets, register_datasets_from_args
from gfocal.data.tiling_config import apply_dataset_tiling
from gfocal.engine import Trainer, launch
from gfocal.engine.batch_scaling import scale_solver_to_batch

__all__ = ["Trainer", "load_config", "setup", "main"]


def load_config(args):
    """The config of ``--config-file`` with the command line's overrides."""
    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    return cfg


def setup(args):
    cfg = load_config(args)
    scaling = scale_solver_to_batch(cfg)
    cfg.freeze()
    # The data checks come before default_setup, which writes into OUTPUT_DIR.
    apply_dataset_tiling(cfg)  # DATASETS.TILING: --dataset datasets cut into windows
    check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST), cfg.MODEL.GFL.NUM_CLASSES)
    default_setup(cfg, args)
    if scaling:
        logging.getLogger("detectron2").info(scaling)
    return cfg


def main(args):
    register_datasets_from_args(args)  # in every worker process
    cfg = setup(args)
    if args.eval_only:
        model, ema_state = Trainer.build_for_eval(cfg, resume=args.resume)
        res = Trainer.test_all(cfg, model, ema_state)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


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
        device=load_config(args).MODEL.DEVICE,
    )
