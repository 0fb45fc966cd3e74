"""The Markdown tables of an ablation sweep (gfocal/engine/ablation.py): per variant the APs of
the lr sweep, and mean ± sample standard deviation over the seeds at its best lr of AP, AP50,
AP75, precision / recall / F1 at IoU 0.4 and the score-IoU rank correlation; and the loss-spike
table (largest classification loss after warm-up over its median)."""
import json
import os
import statistics
from typing import List, Tuple

import yaml

from ..evaluation.coco_metrics import METRIC_KEYS
from ..evaluation.precision_recall import coco_images, score_iou_correlation
from .ablation import PR_KEYS, VAL_SET, VARIANTS, AblationPlan

__all__ = ["table", "spike_table", "score_iou_rank_correlation"]


def _cell(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(plan: AblationPlan) -> str:
    """The sweep's APs, then mean ± sample standard deviation over the seeds at the best lr."""
    keys = METRIC_KEYS + PR_KEYS
    lr_cols = " | ".join(f"AP lr {lr:g}" for lr in plan.lrs)
    rows = [
        f"| variant | {lr_cols} | best lr | seeds | {' | '.join(keys)} | score-IoU rank corr. | AP per seed |",
        "|---|" + "---|" * len(plan.lrs) + "---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for variant in plan.variants:
        sweep = [plan.load_result(variant, lr, plan.seeds[0]) for lr in plan.lrs]
        lr = plan.best_lr(variant)
        runs = [] if lr is None else [plan.load_result(variant, lr, s) for s in plan.seeds]
        runs = [r for r in runs if r is not None]
        cells = [_cell([r[k] for r in runs if k in r]) for k in keys]
        cells.append(_cell([100 * score_iou_rank_correlation(plan, variant, lr, r["seed"]) for r in runs]))
        sweep_cells = [f"{r['AP']:.1f}" if r else "-" for r in sweep]
        rows.append(
            f"| {VARIANTS[variant][0]} | {' | '.join(sweep_cells)} | "
            f"{'-' if lr is None else f'{lr:g}'} | {len(runs)} | {' | '.join(cells)} | "
            f"{' / '.join(format(r['AP'], '.1f') for r in runs)} |"
        )
    return "\n".join(rows) + "\n"


def score_iou_rank_correlation(plan: AblationPlan, variant: str, lr: float, seed: int) -> float:
    """Spearman correlation of the validation detections' scores with their best IoU with a GT."""
    record = plan.load_result(variant, lr, seed) or {}
    detections = record.get("detections", os.path.join("inference", VAL_SET, "coco_instances_results.json"))
    path = os.path.join(plan.run_dir(variant, lr, seed), detections)
    with open(path) as f:
        return score_iou_correlation(coco_images(VAL_SET, json.load(f)))


def spike_table(plan: AblationPlan) -> str:
    """Per variant and swept lr (first seed): the largest classification loss between warm-up and
    the first lr step over its median (a blow-up shows as a large ratio), and the mean IoU of
    the positives' predicted boxes at the end (GFL variants log it as ``pos_iou``)."""
    rows = [
        "| variant | " + " | ".join(f"lr {lr:g}: max/median loss_cls, final pos IoU" for lr in plan.lrs) + " |",
        "|---|" + "---|" * len(plan.lrs),
    ]
    for variant in plan.variants:
        cells = []
        for lr in plan.lrs:
            path = os.path.join(plan.run_dir(variant, lr, plan.seeds[0]), "metrics.json")
            if not os.path.isfile(path):
                cells.append("-")
                continue
            with open(path) as f:
                logged = [json.loads(line) for line in f if line.strip()]
            key = "loss_fcos_cls" if any("loss_fcos_cls" in r for r in logged) else "loss_cls"
            logged = [r for r in logged if key in r]
            warmup, first_step = _solver_marks(path)
            losses = [r[key] for r in logged if warmup <= r["iteration"] < first_step]
            ious = [r["pos_iou"] for r in logged if "pos_iou" in r]
            ratio = max(losses) / statistics.median(losses) if losses else float("nan")
            cells.append(f"{ratio:.2f}" + (f", {ious[-1]:.3f}" if ious else ""))
        rows.append(f"| {VARIANTS[variant][0]} | {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def _solver_marks(metrics_path: str) -> Tuple[int, int]:
    """Warm-up length and first lr step of a run, from the config it saved next to its metrics."""
    with open(os.path.join(os.path.dirname(metrics_path), "config.yaml")) as f:
        text = f.read()
    solver = yaml.safe_load(text)["SOLVER"]
    return int(solver["WARMUP_ITERS"]), int(min(solver["STEPS"]))
