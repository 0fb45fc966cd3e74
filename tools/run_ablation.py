#!/usr/bin/env python
"""The paper's Table 3 ablation re-run on the tree crowns, plus detectron2's RetinaNet and FCOS.

    .venv/bin/python tools/run_ablation.py [--seeds 0 1 2] [--max-iter 100] [KEY VALUE ...]

Every variant trains on the same data, backbone (EfficientNet-Lite0 + 64-channel FPN, P3-P5),
head size (2 convs x 64 channels per tower, GN) and schedule, once per seed, in its own process;
each run writes ``<output-dir>/<variant>/seed<k>/results.json`` and finished runs are skipped
when the script is started again. At the end (or with ``--table-only``) the Markdown table of
mean and sample standard deviation of AP, AP50, AP75 is written to
``<output-dir>/ablation_table.md`` and printed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs/trees/gfl_lite0_trees.yaml")
METRIC_KEYS = ("AP", "AP50", "AP75")

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
    p.add_argument("--max-iter", type=int, default=100, help="iterations of every run")
    p.add_argument("--table-only", action="store_true", help="only (re)write the table")
    p.add_argument("--single", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    return p.parse_args(argv)


def schedule(max_iter: int) -> List[str]:
    """The config's schedule shrunk to ``max_iter``: lr steps at 3/4 and 9/10 of it."""
    return [
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.STEPS", f"({int(max_iter * 0.75)}, {int(max_iter * 0.9)})",
        "SOLVER.WARMUP_ITERS", str(min(50, max_iter // 4)),
    ]


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

    sys.path.insert(0, REPO)
    from detectron2.config import get_cfg
    from detectron2.engine import default_setup

    from gfocal import add_gfl_config
    from train_net import Trainer

    class AblationTrainer(Trainer):
        @classmethod
        def build_model(cls, cfg):
            if cfg.MODEL.META_ARCHITECTURE != "FCOS":
                return super().build_model(cfg)
            return build_fcos(cfg).to(torch.device(cfg.MODEL.DEVICE))

    variant, seed = args.single[0], int(args.single[1])
    out = os.path.join(args.output_dir, variant, f"seed{seed}")
    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(
        VARIANTS[variant][1] + schedule(args.max_iter) + args.opts
        + ["SEED", str(seed), "OUTPUT_DIR", out]
    )
    cfg.freeze()
    default_setup(cfg, argparse.Namespace(config_file=args.config_file, eval_only=False))
    start = time.perf_counter()
    trainer = AblationTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # evaluates once at the end (TEST.EVAL_PERIOD 0) into the event storage
    latest = trainer.storage.latest()
    record = {k: float(latest[f"bbox/{k}"][0]) for k in METRIC_KEYS}
    record.update(variant=variant, seed=seed, max_iter=args.max_iter, wall_s=time.perf_counter() - start)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(record, f, indent=1)


def table(args: argparse.Namespace) -> str:
    rows = [
        f"| variant | runs | {' | '.join(METRIC_KEYS)} |",
        "|---|---|" + "---|" * len(METRIC_KEYS),
    ]
    for variant in args.variants:
        runs = []
        for seed in args.seeds:
            path = os.path.join(args.output_dir, variant, f"seed{seed}", "results.json")
            if os.path.isfile(path):
                with open(path) as f:
                    runs.append(json.load(f))
        cells = []
        for k in METRIC_KEYS:
            values = [r[k] for r in runs]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.1f}")
            else:
                cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
        rows.append(f"| {VARIANTS[variant][0]} | {len(runs)} | {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.single:
        run_single(args)
        return
    if not args.table_only:
        for seed in args.seeds:  # seed-major: a partial run still covers every variant
            for variant in args.variants:
                done = os.path.join(args.output_dir, variant, f"seed{seed}", "results.json")
                if os.path.isfile(done):
                    continue
                cmd = [
                    sys.executable, os.path.abspath(__file__), "--single", variant, str(seed),
                    "--config-file", args.config_file, "--output-dir", args.output_dir,
                    "--max-iter", str(args.max_iter),
                ] + args.opts
                print(f"[ablation] {variant} seed {seed}", flush=True)
                subprocess.run(cmd, check=True, cwd=REPO)
    text = table(args)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "ablation_table.md"), "w") as f:
        f.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
