#!/usr/bin/env python
"""The paper's Table 3 ablation re-run on the tree crowns, plus detectron2's RetinaNet and FCOS.

    .venv/bin/python tools/run_ablation.py [--lrs 0.01 0.02 0.04] [--seeds 0 1 2] [--jobs 2] [KEY VALUE ...]

Every variant trains on the same data, backbone (frozen EfficientNet-Lite0, its features cached
in memory, + 64-channel FPN, P3-P5), head size (2 convs x 64 channels per tower, GN) and schedule
(the config's, or ``--max-iter`` with steps at 3/4 and 9/10). Each variant first runs every
learning rate of ``--lrs`` with the first seed; the lr with the best validation AP is its own
best, at which it then runs the other seeds. Every run is its own process (``--jobs`` at once,
``--threads`` torch threads each) and writes ``<output-dir>/<variant>/lr<lr>/seed<k>/results.json``
(and ``stdout.log``); finished runs are skipped when the script is started again. At the end (or
with ``--table-only``) the Markdown table (the sweep's APs, then mean and sample standard
deviation over the seeds at the best lr of AP, AP50, AP75 and precision/recall/F1 at IoU 0.4) is
written to ``<output-dir>/ablation_table.md`` and printed. With ``--eval-from DIR`` nothing is
trained: the checkpoints of DIR's runs are evaluated with this command's overrides (TTA, voting,
EMA weights; docs/small_data.md), and the table is of those evaluations.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs/trees/gfl_lite0_trees.yaml")
METRIC_KEYS = ("AP", "AP50", "AP75")
TRAIN_SET, VAL_SET = "neon_trees_train", "neon_trees_val"
PR_KEYS = ("precision", "recall", "f1")  # at IoU 0.4, the score threshold chosen on training tiles

# name -> (label in the table, config overrides)
VARIANTS: Dict[str, tuple] = {
    "atss": (
        "ATSS baseline (FL + centerness + Dirac)",
        ["MODEL.GFL.CLS_LOSS", "FL", "MODEL.GFL.QUALITY", "centerness",
         "MODEL.GFL.BOX_REPRESENTATION", "dirac", "MODEL.GFL.USE_DFL", "False"],
    ),
    "qfl": (
        "QFL only (joint score, Dirac box)",
        ["MODEL.GFL.CLS_LOSS", "QFL", "MODEL.GFL.QUALITY", "joint",
         "MODEL.GFL.BOX_REPRESENTATION", "dirac", "MODEL.GFL.USE_DFL", "False"],
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=CONFIG)
    p.add_argument("--output-dir", default=os.path.join(REPO, "output/ablation"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--lrs", nargs="+", type=float, default=[0.01, 0.02, 0.04],
        help="learning rates swept with the first seed; every variant then runs the other seeds "
        "at its own best (by validation AP)",
    )
    p.add_argument("--max-iter", type=int, default=None, help="iterations (default: the config's)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, each its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument(
        "--feature-cache-dir",
        default=os.path.join(REPO, "output/feature_cache"),
        help="MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_DIR of every run: the frozen backbone's "
        "features are computed once for all runs (needs FEATURE_CACHE_MB > 0 in the config)",
    )
    p.add_argument("--table-only", action="store_true", help="only (re)write the table")
    p.add_argument(
        "--eval-from", default="",
        help="an earlier --output-dir: evaluate its runs' checkpoints (same variant, lr, seed) "
        "with this command's overrides (e.g. TEST.AUG.*, MODEL.GFL.BOX_VOTING.*) instead of "
        "training; with TEST.AUG.ENABLED the TTA results are the ones recorded",
    )
    p.add_argument("--single", nargs=3, metavar=("VARIANT", "LR", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    return p.parse_args(argv)


def schedule(max_iter: Optional[int]) -> List[str]:
    """The config's schedule shrunk to ``max_iter``: lr steps at 3/4 and 9/10 of it."""
    if max_iter is None:
        return []
    return [
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.STEPS", f"({int(max_iter * 0.75)}, {int(max_iter * 0.9)})",
        "SOLVER.WARMUP_ITERS", str(min(100, max_iter // 4)),
    ]


def run_dir(args: argparse.Namespace, variant: str, lr: float, seed: int) -> str:
    return os.path.join(args.output_dir, variant, f"lr{lr:g}", f"seed{seed}")


def load_result(args: argparse.Namespace, variant: str, lr: float, seed: int) -> Optional[dict]:
    path = os.path.join(run_dir(args, variant, lr, seed), "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def best_lr(args: argparse.Namespace, variant: str) -> Optional[float]:
    """The swept lr with the highest validation AP of the first seed (None until all ran)."""
    if len(args.lrs) == 1:  # nothing to choose: all seeds run at once
        return args.lrs[0]
    sweep = [(load_result(args, variant, lr, args.seeds[0]), lr) for lr in args.lrs]
    if any(r is None for r, _ in sweep):
        return None
    return max(sweep, key=lambda x: x[0]["AP"])[1]


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


def run_single(args: argparse.Namespace) -> None:
    """One training + evaluation in this process; writes results.json."""
    import torch

    from detectron2.config import get_cfg
    from detectron2.engine import default_setup

    from gfocal import add_gfl_config
    from gfocal.evaluation.precision_recall import results_precision_recall
    from gfocal.engine import Trainer

    class AblationTrainer(Trainer):
        @classmethod
        def build_model(cls, cfg):
            if cfg.MODEL.META_ARCHITECTURE != "FCOS":
                return super().build_model(cfg)
            return build_fcos(cfg).to(torch.device(cfg.MODEL.DEVICE))

    variant, lr, seed = args.single[0], float(args.single[1]), int(args.single[2])
    out = run_dir(args, variant, lr, seed)
    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(
        VARIANTS[variant][1] + schedule(args.max_iter)
        + ["MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_DIR", args.feature_cache_dir] + args.opts
        + ["SOLVER.BASE_LR", str(lr), "SEED", str(seed), "OUTPUT_DIR", out]
        + ["DATASETS.TEST", f'("{TRAIN_SET}", "{VAL_SET}")', "TEST.PRECISION_RECALL.ENABLED", "True"]
    )
    if args.eval_from:
        weights = os.path.join(run_dir(argparse.Namespace(output_dir=args.eval_from), variant, lr, seed),
                               "model_final.pth")
        cfg.merge_from_list(["MODEL.WEIGHTS", weights])
    cfg.freeze()
    default_setup(cfg, argparse.Namespace(config_file=args.config_file, eval_only=bool(args.eval_from)))
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.eval_from:  # evaluation only, of the checkpoint (its EMA weights if so configured)
        model, ema_state = AblationTrainer.build_for_eval(cfg)
        results = AblationTrainer.test_all(cfg, model, ema_state)
    else:
        trainer = AblationTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()  # evaluates once at the end (TEST.EVAL_PERIOD 0)
        results = trainer._last_eval_results
    # The final evaluation ran on the training and the validation tiles: AP on validation;
    # precision/recall at IoU 0.4 on validation at the best-F1 score threshold of the training
    # tiles (chosen per run on training data: FL and QFL scores are calibrated differently).
    suffix = "_TTA" if cfg.TEST.AUG.ENABLED else ""
    record = {k: float(results[VAL_SET + suffix]["bbox"][k]) for k in METRIC_KEYS}
    thresh = float(results[TRAIN_SET + suffix]["pr"]["best_f1_score_thresh"])
    pr = results_precision_recall(
        VAL_SET,
        os.path.join(out, "inference" + suffix, VAL_SET, "coco_instances_results.json"),
        cfg.TEST.PRECISION_RECALL.IOU_THRESH,
        thresh,
    )
    record.update({k: pr[k] for k in PR_KEYS}, score_thresh=thresh)
    record["detections"] = os.path.join("inference" + suffix, VAL_SET, "coco_instances_results.json")
    record.update(
        variant=variant, lr=lr, seed=seed, max_iter=cfg.SOLVER.MAX_ITER,
        wall_s=time.perf_counter() - start,
    )
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(record, f, indent=1)


def _cell(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(args: argparse.Namespace) -> str:
    keys = METRIC_KEYS + PR_KEYS
    lr_cols = " | ".join(f"AP lr {lr:g}" for lr in args.lrs)
    rows = [
        f"| variant | {lr_cols} | best lr | seeds | {' | '.join(keys)} | score-IoU rank corr. | AP per seed |",
        "|---|" + "---|" * len(args.lrs) + "---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for variant in args.variants:
        sweep = [load_result(args, variant, lr, args.seeds[0]) for lr in args.lrs]
        lr = best_lr(args, variant)
        runs = [] if lr is None else [load_result(args, variant, lr, s) for s in args.seeds]
        runs = [r for r in runs if r is not None]
        cells = [_cell([r[k] for r in runs if k in r]) for k in keys]
        cells.append(_cell([100 * score_iou_rank_correlation(args, variant, lr, r["seed"]) for r in runs]))
        sweep_cells = [f"{r['AP']:.1f}" if r else "-" for r in sweep]
        rows.append(
            f"| {VARIANTS[variant][0]} | {' | '.join(sweep_cells)} | "
            f"{'-' if lr is None else f'{lr:g}'} | {len(runs)} | {' | '.join(cells)} | "
            f"{' / '.join(format(r['AP'], '.1f') for r in runs)} |"
        )
    return "\n".join(rows) + "\n"


def score_iou_rank_correlation(args: argparse.Namespace, variant: str, lr: float, seed: int) -> float:
    """Spearman correlation of the validation detections' scores with their best IoU with a GT."""
    from gfocal.evaluation.precision_recall import coco_images, score_iou_correlation

    record = load_result(args, variant, lr, seed) or {}
    detections = record.get("detections", os.path.join("inference", VAL_SET, "coco_instances_results.json"))
    path = os.path.join(run_dir(args, variant, lr, seed), detections)
    with open(path) as f:
        return score_iou_correlation(coco_images(VAL_SET, json.load(f)))


def spike_table(args: argparse.Namespace) -> str:
    """Per variant and swept lr (first seed): the largest classification loss between warm-up and
    the first lr step over its median (a blow-up shows as a large ratio), and the mean IoU of
    the positives' predicted boxes at the end (GFL variants log it as ``pos_iou``)."""
    rows = [
        "| variant | " + " | ".join(f"lr {lr:g}: max/median loss_cls, final pos IoU" for lr in args.lrs) + " |",
        "|---|" + "---|" * len(args.lrs),
    ]
    for variant in args.variants:
        cells = []
        for lr in args.lrs:
            path = os.path.join(run_dir(args, variant, lr, args.seeds[0]), "metrics.json")
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
    import yaml

    solver = yaml.safe_load(text)["SOLVER"]
    return int(solver["WARMUP_ITERS"]), int(min(solver["STEPS"]))


def pending_runs(args: argparse.Namespace) -> List[tuple]:
    """(variant, lr, seed) still to run: the sweep first, then the other seeds at the best lr."""
    todo = [(v, lr, args.seeds[0]) for v in args.variants for lr in args.lrs]
    for v in args.variants:
        lr = best_lr(args, v)
        if lr is not None:
            todo += [(v, lr, s) for s in args.seeds[1:]]
    return [r for r in todo if load_result(args, *r) is None]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.single:
        run_single(args)
        return
    running: Dict[tuple, subprocess.Popen] = {}
    failed = []
    while not args.table_only:
        todo = [r for r in pending_runs(args) if r not in running and r not in failed]
        while todo and len(running) < args.jobs:
            variant, lr, seed = todo.pop(0)
            cmd = [
                sys.executable, os.path.abspath(__file__), "--single", variant, str(lr), str(seed),
                "--config-file", args.config_file, "--output-dir", args.output_dir,
                "--threads", str(args.threads), "--feature-cache-dir", args.feature_cache_dir,
            ] + (["--max-iter", str(args.max_iter)] if args.max_iter else []) \
                + (["--eval-from", args.eval_from] if args.eval_from else []) + args.opts
            log_dir = run_dir(args, variant, lr, seed)
            os.makedirs(log_dir, exist_ok=True)
            log = open(os.path.join(log_dir, "stdout.log"), "w")
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            print(f"[ablation] start {variant} lr {lr:g} seed {seed} (log {log.name})", flush=True)
            running[(variant, lr, seed)] = subprocess.Popen(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        if not running:
            break
        time.sleep(2)
        for key, proc in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"[ablation] {status}: {key[0]} lr {key[1]:g} seed {key[2]}", flush=True)
                if proc.returncode != 0:
                    failed.append(key)
    text = table(args) + "\n" + spike_table(args)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "ablation_table.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    if failed:
        raise SystemExit(f"[ablation] failed runs (see their stdout.log): {failed}")


if __name__ == "__main__":
    main()
