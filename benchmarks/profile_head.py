#!/usr/bin/env python
"""Where the head time goes: GFL's, RetinaNet's and FCOS's heads on the same FPN features.

    .venv/bin/python benchmarks/profile_head.py --threads 2 --repeats 3

The features are GFL's R-50-FPN P3-P7 for one HEIGHT x WIDTH image. Each head runs ``--repeats``
times in rotating order (median wall time reported), then once under torch.profiler: the table
groups its self CPU time by operator (convolution, group norm, ...).
"""

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402
from timing import interleaved, median_of, save_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(models.MODELS), choices=models.MODELS)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default="output/benchmarks/profile_head.json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    heads = {name: models.build(name).eval().head for name in args.models}
    gfl = models.build("GFL").eval()
    with torch.no_grad():
        images = gfl.preprocess_image(models.make_inputs(1, args.height, args.width))
        features = gfl.backbone(images.tensor)
        features = [features[f] for f in gfl.head_in_features]

    def run(name):
        with torch.no_grad():
            start = time.perf_counter()
            heads[name](features)
            return {"head": time.perf_counter() - start}

    run(args.models[0])
    samples = interleaved(args.models, args.repeats, run)
    report = {"args": vars(args), "models": {}}
    for name in args.models:
        with torch.no_grad(), torch.profiler.profile() as prof:
            heads[name](features)
        by_op = defaultdict(float)
        for evt in prof.key_averages():
            by_op[evt.key] += evt.self_cpu_time_total / 1e6
        total = sum(by_op.values())
        top = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:6])
        head = median_of(samples[name], "head")
        report["models"][name] = {
            "head_s": head,
            "profile_self_cpu_s": top,
            "profile_total_s": total,
        }
        shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in top.items())
        print(f"{name:10s} head {head:.3f}s (median of {args.repeats}); profile: {shares}")
    save_json(args.output, report)
    print("wrote", args.output)


if __name__ == "__main__":
    main()
