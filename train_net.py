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
``SOLVER.IMS_PER_BATCH`` (linear scaling rule; gfocal/batch_scaling.py).

With ``MODEL.DEVICE cpu``, ``--num-gpus N`` starts N CPU worker processes (gloo; gfocal/engine.py).

Flags and trailing ``KEY VALUE`` overrides are detectron2's (``default_argument_parser``).
"""
import logging
import os
import weakref

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, verify_results

import gfocal  # noqa: F401  (registers the GFL meta-architecture and backbones)
from gfocal import add_gfl_config
from gfocal.amp import cpu_amp_trainer
from gfocal.batch_scaling import scale_solver_to_batch
from gfocal.checkpoint import GFLCheckpointer
from gfocal.engine import cpu_ddp, launch
from gfocal.data.annotations import check_num_classes, load_train_dataset_dicts
from gfocal.data.augmentation import build_train_augmentation
from gfocal.data.register import add_dataset_arguments, check_datasets, register_datasets_from_args
from gfocal.evaluation import PrecisionRecallEvaluator
from gfocal.nonfinite_guard import NonFiniteLossGuard
from gfocal.utils import has_detectron2_ops


class Trainer(DefaultTrainer):
    """DefaultTrainer with COCO box evaluation (the fast C++ evaluation only where detectron2's
    compiled ops exist), checked and cleaned training annotations (gfocal/data/annotations.py)
    and :class:`GFLCheckpointer` (atomic saves, head mismatch errors)."""

    def __init__(self, cfg):
        # SOLVER.AMP.ENABLED on CPU: bfloat16 autocast (detectron2's AMPTrainer needs CUDA).
        # MODEL.DEVICE cpu with several workers: DistributedDataParallel without device_ids.
        with cpu_amp_trainer(cfg), cpu_ddp(cfg.MODEL.DEVICE):
            super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ makes a plain DetectionCheckpointer just before this call.
        self.checkpointer = GFLCheckpointer(
            self._trainer.model,
            self.cfg.OUTPUT_DIR,
            head_mismatch=self.cfg.MODEL.GFL.CHECKPOINT_HEAD_MISMATCH,
            trainer=weakref.proxy(self),
        )
        # First, so that a non-finite model is never handed to the PeriodicCheckpointer.
        return [NonFiniteLossGuard(self.cfg.SOLVER.CHECKPOINT_PERIOD)] + super().build_hooks()

    def state_dict(self):
        # detectron2 0.6 saves only the iteration and the hooks: the optimizer state (momentum,
        # learning rates) is lost on resume. Upstream detectron2 saves it under the same key.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "load_state_dict" not in DefaultTrainer.__dict__ and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = DatasetMapper(cfg, is_train=True, augmentations=build_train_augmentation(cfg))
        return build_detection_train_loader(cfg, dataset=load_train_dataset_dicts(cfg), mapper=mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_num_classes([dataset_name], cfg.MODEL.GFL.NUM_CLASSES)
        return build_detection_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        coco = COCOEvaluator(
            dataset_name,
            tasks=("bbox",),
            distributed=True,
            output_dir=output_folder,
            use_fast_impl=has_detectron2_ops(),
        )
        pr = cfg.TEST.PRECISION_RECALL
        if not pr.ENABLED:
            return coco
        return DatasetEvaluators(
            [coco, PrecisionRecallEvaluator(dataset_name, pr.IOU_THRESH, pr.SCORE_THRESH, output_folder)]
        )


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
    check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST), cfg.MODEL.GFL.NUM_CLASSES)
    default_setup(cfg, args)
    if scaling:
        logging.getLogger("detectron2").info(scaling)
    return cfg


def main(args):
    register_datasets_from_args(args)  # in every worker process
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        GFLCheckpointer(
            model, cfg.OUTPUT_DIR, head_mismatch=cfg.MODEL.GFL.CHECKPOINT_HEAD_MISMATCH
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
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
