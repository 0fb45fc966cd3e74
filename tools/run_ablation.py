#!/usr/bin/env python
"""The paper's Table 3 ablation re-run on the tree crowns, plus detectron2's RetinaNet and FCOS.

    .venv/bin/python tools/run_ablation.py [--lrs 0.01 0.02 0.04] [--seeds 0 1 2] [--jobs 2] [KEY VALUE ...]

Every variant trains on the same data, backbone (frozen EfficientNet-Lite0, its features cached
in memory, + 64-channel FPN, P3-P5), head size (2 convs x 64 channels per tower, GN) and schedule
(the config's, or ``--max-iter`` with steps at 3/4 and 9/10). Each variant first runs every
learning rate of ``--lrs`` with the first seed; the lr with the best validation AP is its own
best, at which it then runs the other seeds. Every run is its own process (``--jobs`` at once through
``concurrent.futures``, ``--threads`` torch threads each) and writes ``<output-dir>/<variant>/lr<lr>/seed<k>/results.json``
(and ``stdout.log``); finished runs are skipped when the script is started again. At the end (or
with ``--table-only``) the Markdown table (the sweep's APs, then mean and sample standard
deviation over the seeds at the best lr of AP, AP50, AP75 and precision/recall/F1 at IoU 0.4) is
written to ``<output-dir>/ablation_table.md`` and printed. With ``--eval-from DIR`` nothing is
trained: the checkpoints of DIR's runs are evaluated with this command's overrides (TTA, voting,
EMA weights; docs/small_data.md), and the table is of those evaluations.
The variants, one run and the tables are in gfocal/engine/ablation.py and ablation_table.py.
"""
import argparse
import os
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Dict, List

from gfocal.engine.ablation import VARIANTS, AblationPlan, ablation_config, run_one
from gfocal.engine.ablation_table import spike_table, table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs/trees/gfl_lite0_trees.yaml")

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
    from gfocal.config import split_config_overrides

    # Split first: a list flag (--nms / --seeds ...) would read trailing KEY VALUE pairs as values.
    flags, opts = split_config_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(flags)
    args.opts = list(args.opts) + opts
    return args


def plan_of(args: argparse.Namespace) -> AblationPlan:
    return AblationPlan(args.output_dir, args.variants, args.lrs, args.seeds)


def run_single(args: argparse.Namespace) -> None:
    """One training + evaluation in this process (``--single``); writes results.json."""
    import torch

    variant, lr, seed = args.single[0], float(args.single[1]), int(args.single[2])
    weights = ""
    if args.eval_from:  # the same run of the earlier sweep
        earlier = AblationPlan(args.eval_from, (), (), ()).run_dir(variant, lr, seed)
        weights = os.path.join(earlier, "model_final.pth")
    cfg = ablation_config(args.config_file, variant, lr, seed, plan_of(args).run_dir(variant, lr, seed),
                          args.max_iter, args.feature_cache_dir, args.opts, weights)
    torch.set_num_threads(args.threads)
    run_one(cfg, variant, eval_only=bool(args.eval_from))


def run_process(args: argparse.Namespace, variant: str, lr: float, seed: int, log_dir: str) -> int:
    """``--single`` in a child process (its own torch threads), output to ``stdout.log``."""
    cmd = [
        sys.executable, os.path.abspath(__file__), "--single", variant, str(lr), str(seed),
        "--config-file", args.config_file, "--output-dir", args.output_dir,
        "--threads", str(args.threads), "--feature-cache-dir", args.feature_cache_dir,
    ] + (["--max-iter", str(args.max_iter)] if args.max_iter else []) \
        + (["--eval-from", args.eval_from] if args.eval_from else []) + args.opts
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    with open(os.path.join(log_dir, "stdout.log"), "w") as log:
        return subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def run_all(args: argparse.Namespace) -> List[tuple]:
    """Every pending run, ``--jobs`` at once; a variant's other seeds are queued once its lr sweep
    has finished. Returns the failed runs."""
    plan = plan_of(args)
    failed: List[tuple] = []
    finished = set()  # (a run that exits 0 without results.json is not started again)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        running: Dict[object, tuple] = {}
        while True:
            for run in plan.pending():
                if run not in running.values() and run not in failed and run not in finished:
                    log_dir = plan.run_dir(*run)
                    os.makedirs(log_dir, exist_ok=True)
                    print(f"[ablation] queue {run[0]} lr {run[1]:g} seed {run[2]} "
                          f"(log {os.path.join(log_dir, 'stdout.log')})", flush=True)
                    running[pool.submit(run_process, args, *run, log_dir)] = run
            if not running:
                return failed
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run, code = running.pop(future), future.result()
                finished.add(run)
                status = "done" if code == 0 else f"FAILED (exit {code})"
                print(f"[ablation] {status}: {run[0]} lr {run[1]:g} seed {run[2]}", flush=True)
                if code != 0:
                    failed.append(run)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.single:
        run_single(args)
        return
    failed = [] if args.table_only else run_all(args)
    plan = plan_of(args)
    text = table(plan) + "\n" + spike_table(plan)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "ablation_table.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    if failed:
        raise SystemExit(f"[ablation] failed runs (see their stdout.log): {failed}")


if __name__ == "__main__":
    main()
