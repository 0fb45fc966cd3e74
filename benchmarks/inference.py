#!/usr/bin/env python
"""Inference latency of GFL vs detectron2's RetinaNet and FCOS, same backbone, image and threads.

    .venv/bin/python benchmarks/inference.py --threads 2 --warmup 1 --repeats 5
    python benchmarks/inference.py --device cuda --models GFL RetinaNet --depth 101 --fp16 \\
        --repeats 50

Every model gets the same input (batch 1, HEIGHT x WIDTH, no resize); after a warm-up, the models
run in rotating order for ``--repeats`` rounds. Reported: the median total forward time per model,
the time after the head (decoding, top-k, NMS) and its share of the total, and GFL/peer ratios
(median over rounds of the same-round ratio), in wall time and in CPU time (all threads of the
process; steadier than wall time when other jobs share the CPU). All models share the first
one's backbone weights where shapes agree (``models.share_backbone_weights``); heads are
calibrated (``models.calibrate_head``) so that each large level sends its full top-k candidates
to NMS.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402
from timing import StageTimer, interleaved, median_of, paired_ratio, save_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(models.MODELS), choices=models.MODELS)
    p.add_argument("--depth", type=int, default=50, choices=(50, 101))
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fp16", action="store_true", help="autocast float16 (CUDA only)")
    p.add_argument("--output", default="output/benchmarks/inference.json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.fp16 and not args.device.startswith("cuda"):
        raise SystemExit("--fp16 needs --device cuda")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    inputs = models.make_inputs(1, args.height, args.width)
    built, timers = {}, {}
    for name in args.models:
        model = models.build(name, depth=args.depth).to(args.device).eval()
        if built:  # the same backbone weights as the first model
            models.share_backbone_weights(next(iter(built.values())), model)
        print(name, "calibrated biases:", models.calibrate_head(model, inputs))
        timers[name] = StageTimer(model)
        built[name] = model
    cuda = args.device.startswith("cuda")

    def run(name: str):
        model, stage = built[name], timers[name]
        stage.reset()
        with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=args.fp16):
            if cuda:
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            out = model(inputs)
            if cuda:
                torch.cuda.synchronize()
            total = time.perf_counter() - start
        return {
            "total": total,
            "total_cpu": time.process_time() - cpu_start,
            "after_head_cpu": stage.times["after_head_cpu"],
            "head": stage.head_time(),
            "after_head": stage.times["after_head"],
            "detections": len(out[0]["instances"]),
        }

    interleaved(args.models, args.warmup, run)
    samples = interleaved(args.models, args.repeats, run)

    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    report = {
        "args": vars(args),
        "torch": torch.__version__,
        "device": device_name,
        "models": {},
        "ratios": {},
    }
    for name in args.models:
        s = samples[name]
        total = median_of(s, "total")
        after = median_of(s, "after_head")
        report["models"][name] = {
            "total_s": total,
            "fps": 1.0 / total,
            "head_s": median_of(s, "head"),
            "after_head_s": after,
            "after_head_share": after / total,
            "total_cpu_s": median_of(s, "total_cpu"),
            "after_head_cpu_share": median_of(s, "after_head_cpu") / median_of(s, "total_cpu"),
            "detections": median_of(s, "detections"),
            "samples": s,
        }
        print(
            f"{name:10s} total {total:.3f}s ({1 / total:.2f} FPS)  "
            f"head {median_of(s, 'head'):.3f}s  "
            f"after head {after:.3f}s ({100 * after / total:.1f}%); CPU time "
            f"{report['models'][name]['total_cpu_s']:.3f}s, after head "
            f"{100 * report['models'][name]['after_head_cpu_share']:.1f}%"
        )
    if "GFL" in samples:
        for peer in args.models:
            if peer != "GFL":
                ratio = paired_ratio(samples["GFL"], samples[peer], "total")
                cpu_ratio = paired_ratio(samples["GFL"], samples[peer], "total_cpu")
                report["ratios"][f"GFL/{peer}"] = ratio
                report["ratios"][f"GFL/{peer} (CPU time)"] = cpu_ratio
                print(f"GFL/{peer} ratio: wall time {ratio:.3f}, CPU time {cpu_ratio:.3f}")
    save_json(args.output, report)
    print("wrote", args.output)


if __name__ == "__main__":
    main()
