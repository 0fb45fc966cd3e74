#!/usr/bin/env python
"""The frozen EfficientNet-Lite backbone of gfocal against the library it replaces
(``efficientnet-lite-pytorch``'s ``EfficientNet``), same ImageNet weights, same inputs: time per
batch as a ratio in the same process.

    .venv/bin/python benchmarks/backbone_speed.py --threads 2 --repeats 10

gfocal's backbone runs in channels-last (NHWC) memory order and folds each FrozenBatchNorm2d into
its convolution (``gfocal.modeling.efficientnet_lite.conv_norm``); the library's model runs as
shipped (NCHW, BatchNorm in eval mode). Before timing, gfocal's c5 features are checked against
the library's (float rounding only). The inputs are batches
of ``--batch`` random images at each of ``--sizes`` (the tree recipe's TTA sizes); contenders take
turns round by round (``timing.interleaved``). Absolute times only mean something on a quiet
machine: the CPU model and the 1-minute load are printed with them.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backbone_variants import cpu_model  # noqa: E402
from timing import interleaved, median_of, paired_ratio, save_json  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="lite1")
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 400, 480])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output", default="output/bench/backbone_speed.json")
    return p


def library_c5(model, x: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The library model's stem and first ``num_blocks`` blocks (up to c5, as gfocal builds)."""
    y = model._swish(model._bn0(model._conv_stem(x)))
    for block in model._blocks[:num_blocks]:
        y = block(y)
    return y


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    from efficientnet_lite_pytorch import EfficientNet

    from gfocal.modeling.efficientnet_lite import EfficientNetLite, load_lite_weights, packaged_weights

    torch.set_num_threads(args.threads)
    ours = EfficientNetLite(["c5"], freeze_at=5, norm="FrozenBN", variant=args.variant)
    load_lite_weights(ours, "package")
    library = EfficientNet.from_name(f"efficientnet-{args.variant}", image_size=None)
    library.load_state_dict(torch.load(packaged_weights(args.variant), map_location="cpu"))
    contenders = {"gfocal": lambda x: ours(x)["c5"],
                  "library": lambda x: library_c5(library, x, len(ours._blocks))}
    ours.eval(), library.eval()

    gen = torch.Generator().manual_seed(0)
    inputs = {s: torch.randn(args.batch, 3, s, s, generator=gen) for s in args.sizes}
    with torch.no_grad():
        for s, x in inputs.items():
            torch.testing.assert_close(contenders["gfocal"](x), contenders["library"](x),
                                       rtol=1e-4, atol=1e-4, msg=f"c5 at {s} px")

    def run(name: str):
        with torch.no_grad():
            start = time.perf_counter()
            for x in inputs.values():
                contenders[name](x)
            return {"total": time.perf_counter() - start}

    names = list(contenders)
    with torch.no_grad():
        for _ in range(args.warmup):
            for n in names:
                run(n)
    samples = interleaved(names, args.repeats, run)
    load = os.getloadavg()[0]
    rows = {n: {"ms": 1e3 * median_of(s, "total"),
                "library_over_this": 1 / paired_ratio(s, samples["library"], "total")}
            for n, s in samples.items()}
    print(f"CPU {cpu_model()}, {args.threads} threads, 1-min load {load:.2f}; EfficientNet-"
          f"{args.variant.capitalize()} up to c5, batch {args.batch} at each of {args.sizes} px")
    print("| backbone | time per round (ms) | speed-up over the library |")
    print("|---|---|---|")
    for n, r in rows.items():
        print(f"| {n} | {r['ms']:.0f} | {r['library_over_this']:.2f}x |")
    save_json(args.output, {"cpu": cpu_model(), "threads": args.threads, "load_1min": load,
                            "variant": args.variant, "sizes": args.sizes, "batch": args.batch,
                            "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
