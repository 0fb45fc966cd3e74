"""What ``train_net.py`` does with its parsed arguments, for YAML configs: the config of
``--config-file`` and the overrides with the linear scaling rule applied and the datasets checked
(:func:`setup`), then training or ``--eval-only`` evaluation (:func:`train_or_evaluate`)."""
import argparse
import logging

import detectron2.utils.comm as comm
from detectron2.config import CfgNode
from detectron2.engine import default_setup
from detectron2.evaluation import verify_results

from ..config import load_config
from ..data.register import check_datasets
from ..data.tiling_config import apply_dataset_tiling
from .batch_scaling import scale_solver_to_batch
from .trainer import Trainer

__all__ = ["setup", "evaluate", "train_or_evaluate"]


def setup(args: argparse.Namespace) -> CfgNode:
    """The frozen config of ``args.config_file`` + ``args.opts`` (``SOLVER.REFERENCE_IMS_PER_BATCH``
    applied), after checking the datasets it names; then detectron2's ``default_setup`` (logging,
    ``OUTPUT_DIR/config.yaml``, seed)."""
    cfg = load_config(args.config_file, args.opts)
    scaling = scale_solver_to_batch(cfg)
    cfg.freeze()
    # The data checks come before default_setup, which writes into OUTPUT_DIR.
    apply_dataset_tiling(cfg)  # DATASETS.TILING: --dataset datasets cut into windows
    check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST), cfg.MODEL.GFL.NUM_CLASSES)
    default_setup(cfg, args)
    if scaling:
        logging.getLogger("detectron2").info(scaling)
    return cfg


def evaluate(cfg: CfgNode, resume: bool = False, trainer_cls: type = Trainer) -> dict:
    """The evaluation of ``MODEL.WEIGHTS`` (the last checkpoint of ``OUTPUT_DIR`` with ``resume``)
    on ``DATASETS.TEST``, as after training: its EMA weights with
    ``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY``, also with TTA with ``TEST.AUG.ENABLED``;
    detectron2's results dict."""
    model, ema_state = trainer_cls.build_for_eval(cfg, resume=resume)
    return trainer_cls.test_all(cfg, model, ema_state)


def train_or_evaluate(cfg: CfgNode, args: argparse.Namespace, trainer_cls: type = Trainer):
    """With ``args.eval_only``: the evaluation of ``MODEL.WEIGHTS`` (or the last checkpoint with
    ``args.resume``; its EMA weights with ``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY``), returned as
    detectron2's results dict. Else training (resumed with ``args.resume``)."""
    if args.eval_only:
        res = evaluate(cfg, args.resume, trainer_cls)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
