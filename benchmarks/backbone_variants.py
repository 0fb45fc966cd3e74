#!/usr/bin/env python
"""Inference time per tile of the tree model with each EfficientNet-Lite variant
(``MODEL.EFFICIENTNET_LITE.VARIANT``), as ratios to Lite0 in the same process.

    .venv/bin/python benchmarks/backbone_variants.py --threads 2 --repeats 20

Each variant's model is built from the tree config (ImageNet backbone weights from its package,
head at its initial weights: the time does not depend on them), in eval mode, and run on the same
400 px validation tile, batch 1, no TTA; the variants take turns round by round
(``timing.interleaved``) so that machine load hits them alike. Reported: the median forward time
per tile, the time of its backbone (with the FPN), and the median same-round ratio to Lite0. Absolute times
only mean something on a quiet machine (the 1-minute load is printed).
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import StageTimer, interleaved, median_of, paired_ratio, save_json  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default="configs/trees/gfl_lite0_trees.yaml")
    p.add_argument("--variants", nargs="+", default=["lite0", "lite1", "lite2"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--output", default="output/bench/backbone_variants.json")
    return p


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    import cv2
    from detectron2.modeling import build_model

    import gfocal
    from gfocal.evaluation.whole_image import tree_whole_images

    torch.set_num_threads(args.threads)
    rgb = cv2.imread(tree_whole_images("val")["path"])[:400, :400, ::-1]
    image = torch.as_tensor(rgb.copy()).permute(2, 0, 1).float()
    models = {}
    for variant in args.variants:
        cfg = gfocal.load_config(args.config_file, ["MODEL.EFFICIENTNET_LITE.VARIANT", variant,
                                                    "MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB", "0",
                                                    "MODEL.DEVICE", "cpu"])
        models[variant] = build_model(cfg).eval()

    timers = {variant: StageTimer(model) for variant, model in models.items()}

    def run(variant: str):
        """One forward; the preprocessing + backbone (with FPN) time is what precedes the head."""
        timer = timers[variant]
        timer.reset()
        with torch.no_grad():
            start = time.perf_counter()
            models[variant]([{"image": image, "height": 400, "width": 400}])
            total = time.perf_counter() - start
        return {"backbone": total - timer.head_time() - timer.times["after_head"], "total": total}

    for _ in range(args.warmup):
        for v in args.variants:
            run(v)
    samples = interleaved(args.variants, args.repeats, run)
    base = args.variants[0]
    rows = {v: {"total_ms": 1e3 * median_of(s, "total"), "backbone_ms": 1e3 * median_of(s, "backbone"),
                f"ratio_to_{base}": paired_ratio(s, samples[base], "total")}
            for v, s in samples.items()}
    load = os.getloadavg()[0]
    print(f"CPU {cpu_model()}, {args.threads} threads, "
          f"1-min load {load:.2f}")
    print(f"| variant | forward per 400 px tile (ms) | backbone + FPN (ms) | time / {base} |")
    print("|---|---|---|---|")
    for v, r in rows.items():
        print(f"| {v} | {r['total_ms']:.1f} | {r['backbone_ms']:.1f} | {r[f'ratio_to_{base}']:.2f} |")
    save_json(args.output, {"cpu": cpu_model(), "threads": args.threads, "load_1min": load,
                            "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
