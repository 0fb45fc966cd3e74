"""Smoke mode of the executed docs (tests/test_docs_run.py): the ``.venv/bin/python`` (and
``python``) of the docs test's workspace. It runs the documented command as written, with
arguments that shrink its work appended or replaced, so that every command of README.md and
docs/ runs in seconds:

- training (``train_net.py``, ``tools/main_job.py``, ``tools/run_ablation.py``,
  ``lazyconfig_train_net.py``): 2 iterations of batch 2 on the CPU, inputs and test-time
  augmentation at 128 px, TTA of 2 versions (the flip) merged by NMS, no data-loader
  workers, no ImageNet download (``MODEL.WEIGHTS ""`` where the command names no weights);
  the tree-crown tiles are 800 px (16 training, 4 validation tiles; ``DETECTRON2_DATASETS`` of
  the workspace);
- sweeps and ablations: the first value of each swept list (``--seeds``, ``--lrs``,
  ``--variants``, ``--nms``);
- benchmarks: one round at small sizes, one thread (``--threads 1``); the robustness benchmark
  without TTA (``--no-tta``) where the command does not ask for it; ``tools/predict.py --tta``
  with 2 versions per tile;
- export: ``MODEL.GFL.SCORE_THRESH_TEST 0.0`` (a 2-iteration model finds nothing above 0.05);
- ``-m pytest``: ``--collect-only`` (the suite is not run inside itself).

Anything else (``-c CODE``, other scripts) runs unchanged. The rules are the tables below.
"""
import os
import subprocess
import sys
import time
from typing import Dict, List

# Config overrides appended to every YAML training / evaluation command.
TRAIN_OPTS = [
    "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(1,)",
    "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "TEST.AUG.MIN_SIZES", "(128,)", "TEST.AUG.MAX_SIZE", "128", "TEST.AUG.MERGE", "nms",
    "TEST.AUG.DIHEDRAL", "False",
]
LAZY_OPTS = [
    "train.max_iter=2", "train.device=cpu", "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
    "dataloader.train.mapper.augmentations.0.max_size=128",
    "dataloader.test.mapper.augmentations.0.short_edge_length=128",
    "dataloader.test.mapper.augmentations.0.max_size=128",
]
# Smoke tile size of the tree-crown datasets (the workspace builds them so).
SMOKE_TILE_SIZE = 800

# script -> {"replace": {flag: values}, "add": {flag: values} (only if absent),
#            "opts": appended KEY VALUE list, "first": flags whose list keeps its first value}
RULES: Dict[str, dict] = {
    "train_net.py": {"opts": TRAIN_OPTS},
    "tools/main_job.py": {
        "replace": {"--num-draw": ["1"], "--whole-image-splits": ["val"],
                    "--tile-size": [str(SMOKE_TILE_SIZE)]},
        "add": {"--num-draw": ["1"], "--whole-image-splits": ["val"],
                "--tile-size": [str(SMOKE_TILE_SIZE)]},
        "opts": TRAIN_OPTS,
    },
    "tools/run_ablation.py": {
        "first": ["--seeds", "--lrs", "--variants"], "add": {"--variants": ["gfl"]},
        "opts": TRAIN_OPTS,
    },
    "tools/sweep_inference.py": {"first": ["--nms"], "opts": TRAIN_OPTS},
    "tools/analyze_dataset.py": {
        "replace": {"--synthetic-coco": ["20"]},
        "opts": ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128"],
    },
    "tools/demo.py": {"opts": ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"]},
    "lazyconfig_train_net.py": {"opts": LAZY_OPTS},
    # A 2-iteration model scores no box above 0.05, and a sample without detections cannot be
    # traced (the tool refuses it): keep every candidate.
    "tools/export_model.py": {"opts": ["MODEL.GFL.SCORE_THRESH_TEST", "0.0"]},
    "benchmarks/inference.py": {
        "replace": {"--repeats": ["1"], "--warmup": ["0"]},
        "add": {"--height": ["128"], "--width": ["128"]},
    },
    "benchmarks/profile_head.py": {
        "replace": {"--repeats": ["1"]}, "add": {"--height": ["128"], "--width": ["128"]},
    },
    "benchmarks/train_step.py": {
        "replace": {"--repeats": ["1"], "--warmup": ["0"], "--height": ["128"], "--width": ["128"]},
        "first": ["--num-gts"],
    },
    "benchmarks/atss_assign.py": {
        "replace": {"--repeats": ["1"]}, "add": {"--height": ["128"], "--width": ["128"]},
        "first": ["--num-gts"],
    },
    "benchmarks/nodata_skip.py": {"replace": {"--size": ["1024"], "--repeats": ["1"]}},
    "benchmarks/resolution.py": {"replace": {"--gsd": ["0.2"]}, "add": {"--gsd": ["0.2"]}},
    "benchmarks/robustness.py": {"replace": {"--shifts": ["none", "blur-sigma1.5"]},
                                 "add": {"--shifts": ["none", "blur-sigma1.5"], "--no-tta": []}},
    # --tta: 2 versions per tile at the patch size (the recipe's 24 would take minutes)
    "tools/predict.py": {"add": {"--opts": ["TEST.AUG.MIN_SIZES", "(400,)", "TEST.AUG.MAX_SIZE", "400",
                                            "TEST.AUG.DIHEDRAL", "False"]}},
    "benchmarks/backbone_speed.py": {"replace": {"--repeats": ["1"], "--warmup": ["0"], "--sizes": ["64"]},
                                     "add": {"--warmup": ["0"], "--sizes": ["64"]}},
    "benchmarks/backbone_variants.py": {"replace": {"--repeats": ["1"], "--warmup": ["0"]},
                                        "add": {"--warmup": ["0"], "--variants": ["lite0", "lite1"]}},
    "benchmarks/tiled_predict.py": {
        "replace": {"--repeats": ["1"], "--memory-sizes": ["512"], "--image": ["val"],
                    "--crop": ["800"]},
        "add": {"--image": ["val"], "--read-only-size": ["1024"], "--memory-sizes": ["512"],
                "--runs": ["ours", "sahi_gfl"], "--crop": ["800"],
                "--sweep-variants": ["fp32_b1", "openvino_b1"]},
        "first": ["--runs"],
    },
}


# Scripts with a ``--threads`` flag run with one thread, as the docs test runs every command
# (OMP_NUM_THREADS=1 there; these scripts would set their own count over it).
THREADED = ("tools/run_ablation.py", "benchmarks/inference.py", "benchmarks/profile_head.py",
            "benchmarks/train_step.py", "benchmarks/atss_assign.py", "benchmarks/nodata_skip.py",
            "benchmarks/backbone_variants.py", "benchmarks/tiled_predict.py",
            "benchmarks/backbone_speed.py")
for _name in THREADED:
    RULES[_name].setdefault("replace", {})["--threads"] = ["1"]
    RULES[_name].setdefault("add", {})["--threads"] = ["1"]


def _flag_spans(argv: List[str]) -> Dict[str, tuple]:
    """flag -> (start, end) of it and its values in ``argv`` (values: the words up to the next
    word starting with ``--``)."""
    spans, i = {}, 0
    while i < len(argv):
        if argv[i].startswith("--") and "=" not in argv[i]:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--") and not _is_opt(argv[j]):
                j += 1
            spans[argv[i]] = (i, j)
            i = j
        else:
            i += 1
    return spans


def _is_opt(word: str) -> bool:
    """A config override key (``SOLVER.MAX_ITER``) ends a flag's value list."""
    return word.split(".")[0].isupper() and "." in word and "/" not in word


def smoke_argv(script: str, argv: List[str]) -> List[str]:
    """``argv`` (the script's arguments) rewritten by the script's rule."""
    name = script.replace(os.sep, "/")
    while name.startswith("./"):
        name = name[2:]
    rule = RULES.get(name)
    if rule is None:
        return list(argv)
    argv = list(argv)
    for flag in rule.get("first", []):
        span = _flag_spans(argv).get(flag)
        if span and span[1] - span[0] > 2:
            argv[span[0]:span[1]] = argv[span[0]:span[0] + 2]
    for flag, values in rule.get("replace", {}).items():
        span = _flag_spans(argv).get(flag)
        if span:
            argv[span[0]:span[1]] = [flag] + values
    spans = _flag_spans(argv)
    added = []
    for flag, values in rule.get("add", {}).items():
        if flag not in spans:
            added += [flag] + values
    opts = list(rule.get("opts", []))
    if name == "train_net.py" and "MODEL.WEIGHTS" not in argv:
        opts += ["MODEL.WEIGHTS", ""]  # no ImageNet download
    if name == "lazyconfig_train_net.py" and not any(
        a.startswith("train.init_checkpoint=") for a in argv
    ):
        opts.append("train.init_checkpoint=")
    return added + argv + opts


def main(argv: List[str]) -> None:
    real = os.environ["GFOCAL_DOCS_REAL_PYTHON"]
    if argv[:2] == ["-m", "pytest"]:
        os.execv(real, [real, "-m", "pytest", "--collect-only", "-q"] + argv[2:])
    if not argv or argv[0].startswith("-") or not argv[0].endswith(".py"):
        os.execv(real, [real] + argv)
    script, args = argv[0], smoke_argv(argv[0], argv[1:])
    print("[docs smoke] " + " ".join([script] + args), file=sys.stderr, flush=True)
    times = os.environ.get("GFOCAL_DOCS_TIMES")
    if not times:
        os.execv(real, [real, script] + args)
    # Timed: one line per script run (seconds, exit status, the command), for the test's report.
    start = time.perf_counter()
    code = subprocess.call([real, script] + args)
    with open(times, "a") as f:
        f.write(f"{time.perf_counter() - start:.1f}\t{code}\t{' '.join([script] + args)}\n")
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
