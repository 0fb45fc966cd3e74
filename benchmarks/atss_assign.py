#!/usr/bin/env python
"""Time ATSS assignment (``gfocal.modeling.atss.atss_assign``) against the number of GT boxes,
optionally beside the version of ``atss.py`` at another git revision (results must be equal).

    .venv/bin/python benchmarks/atss_assign.py --threads 1 --compare-with 6f1e9c3

Anchors: GFL's (one per location, P3-P7) for a HEIGHT x WIDTH batch of ``--batch`` images; GT
boxes random (sides 8 to 408 px). Each call is timed ``--repeats`` times (median) after a warm-up.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import tempfile
import time

import torch

from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes

from gfocal.modeling.atss import atss_assign

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATSS_PATH = "projects/GFocal/gfocal/modeling/atss.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num-gts", type=int, nargs="+", default=[1, 10, 100, 500])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare-with", default="", help="git revision of atss.py to time beside")
    return p.parse_args(argv)


def load_revision(rev: str):
    source = subprocess.run(
        ["git", "show", f"{rev}:{ATSS_PATH}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "atss_rev.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("atss_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.atss_assign


def gfl_anchors(height: int, width: int):
    strides = [8, 16, 32, 64, 128]
    generator = DefaultAnchorGenerator(
        sizes=[[8 * s] for s in strides], aspect_ratios=[1.0], strides=strides, offset=0.0
    )
    features = [torch.zeros(1, 1, -(-height // s), -(-width // s)) for s in strides]
    anchors = generator(features)
    return Boxes.cat(anchors).tensor, [len(a) for a in anchors]


def timed(fn, *args, repeats: int):
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    anchors, per_level = gfl_anchors(args.height, args.width)
    other = load_revision(args.compare_with) if args.compare_with else None
    g = torch.Generator().manual_seed(0)
    print(f"{anchors.shape[0]} anchors, {args.batch} images, {args.threads} thread(s)")
    for n in args.num_gts:
        size = torch.rand(args.batch, n, 2, generator=g) * 400 + 8
        corner = torch.rand(args.batch, n, 2, generator=g) * torch.tensor([args.width, args.height])
        gt = torch.cat([corner, corner + size], dim=-1)
        valid = torch.ones(args.batch, n, dtype=torch.bool)
        inputs = (anchors, per_level, gt, valid, 9)
        t, out = timed(atss_assign, *inputs, repeats=args.repeats)
        line = f"{n:4d} GT/image: {t * 1e3:8.1f} ms"
        if other is not None:
            t_other, out_other = timed(other, *inputs, repeats=args.repeats)
            if not torch.equal(out, out_other):
                raise SystemExit(f"{n} GT/image: assignments differ from {args.compare_with}")
            line += f"   {args.compare_with}: {t_other * 1e3:8.1f} ms (same assignment)"
        print(line)


if __name__ == "__main__":
    main()
