"""The paper's Table 3 ablation (QFL, DFL and their combination against the ATSS baseline; Li et
al. 2020) as config overrides of one recipe, plus detectron2's RetinaNet and FCOS, and the
bookkeeping of a sweep: learning rates with the first seed, then the other seeds at each variant's
best lr, each run's ``results.json`` under ``<output_dir>/<variant>/lr<lr>/seed<k>/``.
``tools/run_ablation.py`` is its command line; the tables are in ablation_table.py."""
import argparse
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.engine import default_setup

from ..config import load_config
from ..evaluation.coco_metrics import box_metrics
from ..evaluation.precision_recall import results_precision_recall
from .trainer import Trainer

__all__ = ["VARIANTS", "PR_KEYS", "AblationPlan", "schedule", "ablation_config", "run_one",
           "AblationTrainer", "build_fcos"]

TRAIN_SET, VAL_SET = "neon_trees_train", "neon_trees_val"
PR_KEYS = ("precision", "recall", "f1")  # at IoU 0.4, the score threshold chosen on training tiles

# name -> (label in the table, config overrides)
# A Dirac box has no edge distribution for variance-weighted voting (the tree recipe's): with
# voting on, the Dirac variants weight the votes by score (gfocal/modeling/box_voting.py).
DIRAC_VOTING = ["MODEL.GFL.BOX_VOTING.WEIGHTING", "score"]
VARIANTS: Dict[str, tuple] = {
    "atss": (
        "ATSS baseline (FL + centerness + Dirac)",
        ["MODEL.GFL.CLS_LOSS", "FL", "MODEL.GFL.QUALITY", "centerness",
         "MODEL.GFL.BOX_REPRESENTATION", "dirac", "MODEL.GFL.USE_DFL", "False",
         *DIRAC_VOTING],
    ),
    "qfl": (
        "QFL only (joint score, Dirac box)",
        ["MODEL.GFL.CLS_LOSS", "QFL", "MODEL.GFL.QUALITY", "joint",
         "MODEL.GFL.BOX_REPRESENTATION", "dirac", "MODEL.GFL.USE_DFL", "False",
         *DIRAC_VOTING],
    ),
    "dfl": (
        "DFL only (FL + centerness, distribution box)",
        ["MODEL.GFL.CLS_LOSS", "FL", "MODEL.GFL.QUALITY", "centerness",
         "MODEL.GFL.BOX_REPRESENTATION", "distribution", "MODEL.GFL.USE_DFL", "True"],
    ),
    "gfl": (
        "GFL (QFL + DFL)",
        ["MODEL.GFL.CLS_LOSS", "QFL", "MODEL.GFL.QUALITY", "joint",
         "MODEL.GFL.BOX_REPRESENTATION", "distribution", "MODEL.GFL.USE_DFL", "True"],
    ),
    "gflv2": (
        "GFLv2 (GFL + DGQP quality from the distributions)",
        ["MODEL.GFL.CLS_LOSS", "QFL", "MODEL.GFL.QUALITY", "dgqp",
         "MODEL.GFL.BOX_REPRESENTATION", "distribution", "MODEL.GFL.USE_DFL", "True"],
    ),
    "retinanet": (
        "detectron2 RetinaNet (9 anchors, FL + smooth-L1)",
        ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.RETINANET.NUM_CLASSES", "1",
         "MODEL.RETINANET.IN_FEATURES", "['p3', 'p4', 'p5']", "MODEL.RETINANET.NUM_CONVS", "2",
         "MODEL.RETINANET.NORM", "GN", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.05",
         # 4 x stride at 3 octave scales per level, 3 aspect ratios (detectron2's defaults).
         "MODEL.ANCHOR_GENERATOR.SIZES",
         "[[32, 40.32, 50.80], [64, 80.63, 101.59], [128, 161.27, 203.19]]"],
    ),
    "fcos": ("detectron2 FCOS (FL + centerness + GIoU)", ["MODEL.META_ARCHITECTURE", "FCOS"]),
}


Run = Tuple[str, float, int]  # (variant, lr, seed)


@dataclass
class AblationPlan:
    """Which runs a sweep makes and where their results are."""

    output_dir: str
    variants: Sequence[str]
    lrs: Sequence[float]
    seeds: Sequence[int]

    def run_dir(self, variant: str, lr: float, seed: int) -> str:
        return os.path.join(self.output_dir, variant, f"lr{lr:g}", f"seed{seed}")

    def load_result(self, variant: str, lr: float, seed: int) -> Optional[dict]:
        path = os.path.join(self.run_dir(variant, lr, seed), "results.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def best_lr(self, variant: str) -> Optional[float]:
        """The swept lr with the highest validation AP of the first seed (None until all ran)."""
        if len(self.lrs) == 1:  # nothing to choose: all seeds run at once
            return self.lrs[0]
        sweep = [(self.load_result(variant, lr, self.seeds[0]), lr) for lr in self.lrs]
        if any(r is None for r, _ in sweep):
            return None
        return max(sweep, key=lambda x: x[0]["AP"])[1]

    def pending(self) -> List[Run]:
        """Runs still to make: the sweep first, then the other seeds at the best lr."""
        todo = [(v, lr, self.seeds[0]) for v in self.variants for lr in self.lrs]
        for v in self.variants:
            lr = self.best_lr(v)
            if lr is not None:
                todo += [(v, lr, s) for s in self.seeds[1:]]
        return [r for r in todo if self.load_result(*r) is None]


def schedule(max_iter: Optional[int]) -> List[str]:
    """The config's schedule shrunk to ``max_iter``: lr steps at 3/4 and 9/10 of it."""
    if max_iter is None:
        return []
    return [
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.STEPS", f"({int(max_iter * 0.75)}, {int(max_iter * 0.9)})",
        "SOLVER.WARMUP_ITERS", str(min(100, max_iter // 4)),
    ]


def ablation_config(config_file: str, variant: str, lr: float, seed: int, output_dir: str,
                    max_iter: Optional[int] = None, feature_cache_dir: str = "",
                    opts: Sequence[str] = (), weights: str = "") -> CfgNode:
    """The frozen config of one run: the recipe, the variant's switches, the schedule, ``opts``,
    then lr, seed, output folder and the evaluation on the training and validation tiles with
    precision / recall (``weights``: a checkpoint to evaluate instead of training)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {list(VARIANTS)}")
    cfg = load_config(config_file, VARIANTS[variant][1] + schedule(max_iter)
                      + ["MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_DIR", feature_cache_dir]
                      + list(opts)
                      + ["SOLVER.BASE_LR", str(lr), "SEED", str(seed), "OUTPUT_DIR", output_dir]
                      + ["DATASETS.TEST", f'("{TRAIN_SET}", "{VAL_SET}")',
                         "TEST.PRECISION_RECALL.ENABLED", "True"])
    if weights:
        cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    return cfg


def run_one(cfg: CfgNode, variant: str, eval_only: bool = False) -> Dict[str, object]:
    """Train (or with ``eval_only`` evaluate ``MODEL.WEIGHTS``, its EMA weights if so configured)
    and write ``OUTPUT_DIR/results.json``: validation AP/AP50/AP75 and precision / recall / F1
    at IoU TEST.PRECISION_RECALL.IOU_THRESH, at the best-F1 score threshold of the training tiles
    (chosen per run on training data: FL and QFL scores are calibrated differently)."""
    default_setup(cfg, argparse.Namespace(config_file="", eval_only=eval_only))
    start = time.perf_counter()
    if eval_only:
        model, ema_state = AblationTrainer.build_for_eval(cfg)
        results = AblationTrainer.test_all(cfg, model, ema_state)
    else:
        trainer = AblationTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()  # evaluates once at the end (TEST.EVAL_PERIOD 0)
        results = trainer._last_eval_results
    suffix = "_TTA" if cfg.TEST.AUG.ENABLED else ""
    record: Dict[str, object] = dict(box_metrics(results, VAL_SET, suffix, num_datasets=2))
    thresh = float(results[TRAIN_SET + suffix]["pr"]["best_f1_score_thresh"])
    detections = os.path.join("inference" + suffix, VAL_SET, "coco_instances_results.json")
    pr = results_precision_recall(VAL_SET, os.path.join(cfg.OUTPUT_DIR, detections),
                                  cfg.TEST.PRECISION_RECALL.IOU_THRESH, thresh)
    record.update({k: pr[k] for k in PR_KEYS}, score_thresh=thresh)
    record["detections"] = detections
    record.update(variant=variant, lr=cfg.SOLVER.BASE_LR, seed=cfg.SEED,
                  max_iter=cfg.SOLVER.MAX_ITER, wall_s=time.perf_counter() - start)
    with open(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


class AblationTrainer(Trainer):
    """The project's trainer, building detectron2's FCOS for ``MODEL.META_ARCHITECTURE FCOS``."""

    @classmethod
    def build_model(cls, cfg):
        if cfg.MODEL.META_ARCHITECTURE != "FCOS":
            return super().build_model(cfg)
        return build_fcos(cfg).to(torch.device(cfg.MODEL.DEVICE))


def build_fcos(cfg):
    """detectron2's FCOS (not in its registry in 0.6, no from_config) on the same backbone,
    with a head of the same depth and width as the GFL head."""
    from detectron2.modeling import build_backbone
    from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead

    backbone = build_backbone(cfg)
    features = list(cfg.MODEL.GFL.IN_FEATURES)
    shapes = [backbone.output_shape()[f] for f in features]
    dim = cfg.MODEL.GFL.CONV_DIM or shapes[0].channels
    head = FCOSHead(
        input_shape=shapes,
        conv_dims=[dim] * cfg.MODEL.GFL.NUM_CONVS,
        num_classes=cfg.MODEL.GFL.NUM_CLASSES,
        norm=cfg.MODEL.GFL.NORM,
        prior_prob=cfg.MODEL.GFL.PRIOR_PROB,
    )
    return FCOS(
        backbone=backbone,
        head=head,
        head_in_features=features,
        num_classes=cfg.MODEL.GFL.NUM_CLASSES,
        test_score_thresh=cfg.MODEL.GFL.SCORE_THRESH_TEST,
        test_nms_thresh=cfg.MODEL.GFL.NMS_THRESH_TEST,
        max_detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
    )

