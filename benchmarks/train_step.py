#!/usr/bin/env python
"""Training step time and peak memory of GFL vs detectron2's FCOS (and RetinaNet), same batch.

    .venv/bin/python benchmarks/train_step.py --num-gts 1 10 100 500 --repeats 3 --memory

For every GT count in ``--num-gts`` (boxes per image), all models run one SGD step (forward,
losses, backward, update) on the same random batch; every round runs all (model, GT count) pairs
in rotating order, ``--repeats`` rounds after ``--warmup``. Reported per model: the median step
time, the share of the step spent after the head in the forward pass (label assignment + losses)
and in the assignment alone, GFL/peer ratios, and how the step grows with the GT count (ratios
within a round). ``--memory`` also measures each model's peak resident
memory during one step, each in a fresh process (RSS high-water mark minus RSS before the step).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict

import torch

from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402
from timing import (
    StageTimer,
    interleaved,
    median_of,
    paired_ratio,
    save_json,
    wrap_function,
)  # noqa: E402

# The assignment function of each model, timed on its own: (module or model attribute, name).
ASSIGNERS = {
    "GFL": "gfocal.modeling.gfl:atss_assign",
    "FCOS": "model:match_anchors",
    "RetinaNet": "model:label_anchors",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["GFL", "FCOS"], choices=models.MODELS)
    p.add_argument("--depth", type=int, default=50, choices=(50, 101))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--height", type=int, default=640)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--num-gts", type=int, nargs="+", default=[1, 10, 100, 500])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="peak RSS per model, in child processes")
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    p.add_argument("--output", default="output/benchmarks/train_step.json")
    return p.parse_args(argv)


def make_batch(
    batch: int, height: int, width: int, num_gts: int, num_classes: int = 80, seed: int = 0
):
    """Random images with ``num_gts`` random boxes each (sides 8 to 50% of the image)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for img in models.make_inputs(batch, height, width, seed):
        size = torch.rand(num_gts, 2, generator=g) * 0.5 * torch.tensor([width, height]) + 8
        x0y0 = torch.rand(num_gts, 2, generator=g) * (torch.tensor([width, height]) - size)
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.cat([x0y0, x0y0 + size], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (num_gts,), generator=g)
        img["instances"] = inst
        out.append(img)
    return out


def train_step(model, optimizer, batch) -> Dict[str, float]:
    times = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    with EventStorage():
        losses = model(batch)
        total_loss = sum(losses.values())
        forward_end = time.perf_counter()
        optimizer.zero_grad()
        total_loss.backward()
        optimizer.step()
    times["step"] = time.perf_counter() - start
    times["step_cpu"] = time.process_time() - cpu_start
    times["forward"] = forward_end - start
    if not torch.isfinite(total_loss):
        raise FloatingPointError(f"non-finite loss {losses}")
    return times


def build_for_training(name: str, args):
    model = models.build(name, depth=args.depth).train()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9
    )
    return model, optimizer


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args) -> None:
    """One model, one step (after one warm-up step), print the peak RSS increase in MiB as JSON."""
    name, num_gts = args.memory_child.split(":")
    torch.set_num_threads(args.threads)
    model, optimizer = build_for_training(name, args)
    batch = make_batch(args.batch, args.height, args.width, int(num_gts))
    before = _rss_kb("VmRSS")
    train_step(model, optimizer, batch)
    print(json.dumps({"peak_step_mib": (_rss_kb("VmHWM") - before) / 1024}))


def measure_memory(args) -> Dict[str, Dict[int, float]]:
    result: Dict[str, Dict[int, float]] = {}
    for name in args.models:
        for n in args.num_gts:
            cmd = [
                sys.executable,
                "-W",
                "ignore",
                os.path.abspath(__file__),
                "--memory-child",
                f"{name}:{n}",
                "--batch",
                str(args.batch),
                "--height",
                str(args.height),
                "--width",
                str(args.width),
                "--depth",
                str(args.depth),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            mib = json.loads(out.strip().splitlines()[-1])["peak_step_mib"]
            result.setdefault(name, {})[n] = mib
            print(f"{name:10s} {n:4d} GT/image: peak step memory {mib:.0f} MiB")
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    built, stages, assign_times = {}, {}, {}
    for name in args.models:
        model, optimizer = build_for_training(name, args)
        stages[name] = StageTimer(model)
        assign_times[name] = {}
        where, fn = ASSIGNERS[name].split(":")
        owner = model if where == "model" else sys.modules[where]
        # Module-level functions are shared by every model of that class: one GFL per run.
        wrap_function(owner, fn, assign_times[name])
        built[name] = (model, optimizer)

    batches = {n: make_batch(args.batch, args.height, args.width, n) for n in args.num_gts}

    def run(key: str) -> Dict[str, float]:
        name, n = key.split("@")
        model, optimizer = built[name]
        stages[name].reset()
        assign_times[name].clear()
        times = train_step(model, optimizer, batches[int(n)])
        times["assign_and_losses"] = stages[name].times["after_head"]
        times["assign"] = sum(assign_times[name].values())
        return times

    # Every round runs every (model, GT count) pair, in rotating order: ratios between models and
    # between GT counts are taken within a round, under the same load.
    keys = [f"{name}@{n}" for n in args.num_gts for name in args.models]
    interleaved(keys, args.warmup, run)
    samples = interleaved(keys, args.repeats, run)

    report = {"args": vars(args), "torch": torch.__version__, "by_num_gts": {}, "growth": {}}
    for n in args.num_gts:
        entry = {"models": {}, "ratios": {}}
        for name in args.models:
            s = samples[f"{name}@{n}"]
            step = median_of(s, "step")
            assign_ms = median_of(s, "assign") * 1e3
            entry["models"][name] = {
                "step_s": step,
                "assign_and_losses_share": median_of(s, "assign_and_losses") / step,
                "assign_share": median_of(s, "assign") / step,
                "assign_s": median_of(s, "assign"),
                "samples": s,
            }
            print(
                f"{n:4d} GT/image {name:10s} step {step:.3f}s  assignment+losses "
                f"{100 * entry['models'][name]['assign_and_losses_share']:.1f}%  assignment "
                f"{100 * entry['models'][name]['assign_share']:.1f}% ({assign_ms:.1f} ms)"
            )
        for peer in args.models:
            if peer != "GFL" and "GFL" in args.models:
                gfl, other = samples[f"GFL@{n}"], samples[f"{peer}@{n}"]
                ratio = paired_ratio(gfl, other, "step")
                cpu_ratio = paired_ratio(gfl, other, "step_cpu")
                entry["ratios"][f"GFL/{peer}"] = ratio
                entry["ratios"][f"GFL/{peer} (CPU time)"] = cpu_ratio
                print(
                    f"{n:4d} GT/image GFL/{peer} step ratio: wall time {ratio:.3f}, "
                    f"CPU time {cpu_ratio:.3f}"
                )
        report["by_num_gts"][n] = entry

    first = args.num_gts[0]
    for name in args.models:
        for n in args.num_gts[1:]:
            growth = paired_ratio(samples[f"{name}@{n}"], samples[f"{name}@{first}"], "step")
            report["growth"].setdefault(name, {})[n] = growth
            print(
                f"{name}: step({n} GT) / step({first} GT) = {growth:.3f} ({n // first}x the boxes)"
            )
    if args.memory:
        report["peak_step_mib"] = measure_memory(args)
    save_json(args.output, report)
    print("wrote", args.output)


if __name__ == "__main__":
    main()
