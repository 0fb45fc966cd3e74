"""The GFL trainer: detectron2's ``DefaultTrainer`` with the project's checkpointer, hooks (EMA,
non-finite loss guard), CPU autocast and CPU multi-process training, for YAML configs.
``train_net.py`` is its command line."""
import contextlib
import logging
import os
import weakref
from collections import OrderedDict

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

from ..data.annotations import check_num_classes, load_train_dataset_dicts
from ..data.augmentation import build_train_augmentation
from ..data.tile_crop import build_train_mapper
from ..evaluation import PrecisionRecallEvaluator
from ..evaluation.whole_image import build_whole_image_evaluator
from ..inference.test_time_augmentation import GFLWithTTA
from ..model_io.checkpoint import GFLCheckpointer
from ..model_io.weights import evaluates_ema_weights
from ..utils import has_detectron2_ops
from .amp import cpu_amp_trainer
from .hooks import EMAHook, NonFiniteLossGuard, build_ema_state, load_ema_for_eval
from .launch import cpu_ddp

__all__ = ["Trainer"]


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
        # MODEL_EMA.ENABLED: averaged weights, saved as the checkpointable "ema_state".
        self.ema_state = build_ema_state(self.cfg, self._trainer.model)
        extra = {} if self.ema_state is None else {"ema_state": self.ema_state}
        # DefaultTrainer.__init__ makes a plain DetectionCheckpointer just before this call.
        self.checkpointer = GFLCheckpointer(
            self._trainer.model,
            self.cfg.OUTPUT_DIR,
            head_mismatch=self.cfg.MODEL.GFL.CHECKPOINT_HEAD_MISMATCH,
            trainer=weakref.proxy(self),
            **extra,
        )
        # The non-finite loss guard first, so that a non-finite model is never handed to the
        # PeriodicCheckpointer.
        ret = [NonFiniteLossGuard(self.cfg.SOLVER.CHECKPOINT_PERIOD)] + super().build_hooks()
        if self.ema_state is None and not self.cfg.TEST.AUG.ENABLED:
            return ret
        # The EMA update before the checkpointer and the evaluation; the evaluation of the EMA
        # weights (and the raw ones, TTA) replaces DefaultTrainer's.
        def evaluate():
            self._last_eval_results = self.test_all(self.cfg, self.model, self.ema_state)
            return self._last_eval_results

        ret = [hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, evaluate)
               if isinstance(h, hooks.EvalHook) else h for h in ret]
        if self.ema_state is not None:
            ema = self.cfg.MODEL_EMA
            # (only the main process has a checkpointer; every process evaluates)
            first = next(i for i, h in enumerate(ret)
                         if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook)))
            ret.insert(first, EMAHook(self.ema_state, ema.DECAY, ema.DECAY_WARM_UP_FACTOR))
        return ret

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
        mapper = build_train_mapper(cfg, build_train_augmentation(cfg))  # DATASETS.TILING crops
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
        whole = build_whole_image_evaluator(cfg, dataset_name, output_folder)  # TEST.WHOLE_IMAGE
        if not pr.ENABLED and whole is None:
            return coco
        return DatasetEvaluators(
            [coco] + ([PrecisionRecallEvaluator(dataset_name, pr.IOU_THRESH, pr.SCORE_THRESH,
                                                output_folder)] if pr.ENABLED else [])
            + ([] if whole is None else [whole])
        )

    @classmethod
    def build_for_eval(cls, cfg, resume: bool = False):
        """The model with MODEL.WEIGHTS (or the last checkpoint with ``resume``), and the EMA
        state to evaluate (MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY) or None."""
        model = cls.build_model(cfg)
        ema_state = build_ema_state(cfg, model)
        checkpointer = GFLCheckpointer(
            model, cfg.OUTPUT_DIR, head_mismatch=cfg.MODEL.GFL.CHECKPOINT_HEAD_MISMATCH,
            **({} if ema_state is None else {"ema_state": ema_state}),
        )
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
        path = checkpointer.get_checkpoint_file() if resume and checkpointer.has_checkpoint() \
            else cfg.MODEL.WEIGHTS
        use_ema = evaluates_ema_weights(cfg)  # the one rule (gfocal/model_io/weights.py)
        return model, load_ema_for_eval(checkpointer, path, use_ema)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluation with test-time augmentation (TEST.AUG), results named ``<dataset>_TTA``
        (as detectron2's tools/train_net.py does for R-CNN)."""
        logging.getLogger("detectron2.trainer").info("Running inference with TTA ...")
        return cls._test_named(cfg, GFLWithTTA(cfg, model), "_TTA")

    @classmethod
    def _test_named(cls, cfg, model, suffix: str):
        evaluators = [
            cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference" + suffix, name))
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        return OrderedDict((k + suffix, v) for k, v in res.items())

    @classmethod
    def test_all(cls, cfg, model, ema_state=None):
        """The model (its EMA weights when ``ema_state`` is given), with TEST.AUG.ENABLED also
        with TTA; with MODEL_EMA.EVAL_RAW_MODEL also the raw weights (``<dataset>_raw``)."""
        averaged = contextlib.nullcontext() if ema_state is None else ema_state.apply_and_restore(model)
        with averaged:
            res = cls.test(cfg, model)
            if cfg.TEST.AUG.ENABLED:
                res.update(cls.test_with_TTA(cfg, model))
        if ema_state is not None and cfg.MODEL_EMA.EVAL_RAW_MODEL:
            res.update(cls._test_named(cfg, model, "_raw"))
        return res
