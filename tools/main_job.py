#!/usr/bin/env python
"""The main job: GFL on real aerial tree crowns, end to end on a CPU in minutes.

    .venv/bin/python tools/main_job.py [--output-dir output/main_job] [KEY VALUE ...]

1. builds the tiled COCO tree-crown datasets from the deepforest wheel (idempotent, checked);
2. trains GFL with ``train_net.py`` on ``configs/trees/gfl_lite0_trees.yaml`` (progress and ETA
   from detectron2's writers), which evaluates once at the end with COCOEvaluator (its AP is read
   from the run's metrics.json);
3. evaluates the written checkpoint again as ``train_net.py --eval-only`` does
   (gfocal.engine.defaults.evaluate) on the training and validation tiles, checks that the
   validation AP is the same, and reports precision / recall / F1 at IoU 0.4 on validation at the
   score threshold with the best F1 on the training tiles (every 2nd column and row of their
   grid and the last ones, ``--threshold-tile-step``; the frozen backbone's features of the
   training tiles are read from ``--feature-cache-dir``, where training wrote them);
4. draws ground truth (green; border-cut crowns grey) and the evaluation's detections (red, with
   scores) at that threshold on the validation tiles (gfocal.visualization) as PNGs;
5. writes ``summary.json`` and prints AP/AP50/AP75, precision/recall and where the files are.

Trailing ``KEY VALUE`` pairs are config overrides for both runs (e.g. ``SOLVER.MAX_ITER 20``).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SET, VAL_SET = "neon_trees_train", "neon_trees_val"


def _splits(text: str) -> List[str]:
    splits = [s for s in text.split(",") if s]
    if any(s not in ("train", "val") for s in splits):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated 'train' and 'val'")
    return splits


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(REPO, "configs/trees/gfl_lite0_trees.yaml"))
    p.add_argument("--output-dir", default=os.path.join(REPO, "output/main_job"))
    p.add_argument(
        "--data-root",
        default=os.getenv("DETECTRON2_DATASETS", os.path.join(REPO, "datasets")),
        help="datasets folder (DETECTRON2_DATASETS); the tiles go to <data-root>/neon_trees",
    )
    p.add_argument("--tile-size", type=int, default=400, help="tile side in pixels")
    p.add_argument("--train-overlap", type=int, default=200, help="overlap of training tiles (px)")
    p.add_argument("--val-overlap", type=int, default=0, help="overlap of validation tiles (px)")
    p.add_argument(
        "--min-visible",
        type=float,
        default=0.5,
        help="a border-cut box with less of its area inside the tile becomes iscrowd (ignored)",
    )
    p.add_argument("--num-draw", type=int, default=12, help="validation tiles to draw")
    p.add_argument("--draw-score-thresh", type=float, default=None, help="score of drawn boxes "
                   "(default: the best-F1 threshold chosen on the training tiles)")
    p.add_argument("--threshold-tile-step", type=int, default=2,
                   help="the score threshold is chosen (best F1) on the training tiles in every "
                   "N-th column and row of their grid and the last ones: 2 (default) keeps 42 of "
                   "the 132, which still cover the training image and chose the threshold all "
                   "132 chose (3 seeds; docs/small_data.md) in a third of the time; 1: all")
    p.add_argument("--ap-tolerance", type=float, default=1e-6, help="largest AP difference "
                   "accepted between the training run and --eval-only")
    p.add_argument("--whole-image-splits", type=_splits, default="val",
                   help="whole YELL images predicted tile by tile (gfocal.inference) and scored "
                   "whole: comma-separated train / val ('train,val' adds the training image, 4x "
                   "the validation image's patches), or '' for none")
    p.add_argument("--whole-image-tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation of each tile of the whole images (default: when "
                   "TEST.AUG.ENABLED, as the tiles' evaluation)")
    p.add_argument("--feature-cache-dir", default=None,
                   help="where training writes the frozen backbone's features for the evaluations "
                   "after it to read (MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_DIR, FEATURE_CACHE_AT_TEST); "
                   "default <output-dir>/feature_cache, removed at the end; '' for none (the "
                   "evaluations compute them again)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def build_data(args: argparse.Namespace) -> str:
    """The tiled tree-crown datasets of ``args`` (built once, then checked); returns their root."""
    from gfocal.data.tree_crowns import TileSpec, build_tree_crowns

    spec = TileSpec(args.tile_size, args.train_overlap, args.val_overlap, args.min_visible)
    return build_tree_crowns(spec=spec)


def feature_cache_dir(cfg, args: argparse.Namespace, out: str) -> Tuple[str, bool]:
    """The folder through which training hands the frozen backbone's features to the evaluations
    after it ("" when the config caches none, or ``--feature-cache-dir ''``), and whether it is
    the job's own (removed at the end) rather than one the user named. The training tiles are
    evaluated with the 8 symmetries training saw, so their features are all there."""
    ecfg = cfg.MODEL.EFFICIENTNET_LITE
    if "efficientnet" not in cfg.MODEL.BACKBONE.NAME or ecfg.FEATURE_CACHE_MB <= 0:
        return "", False
    if ecfg.FEATURE_CACHE_DIR:  # the user's own folder (an override), kept
        return ecfg.FEATURE_CACHE_DIR, False
    if args.feature_cache_dir is not None:
        return args.feature_cache_dir, False
    return os.path.join(out, "feature_cache"), True


def _count_files(folder: str) -> int:
    return len(os.listdir(folder)) if folder and os.path.isdir(folder) else 0


def train(args: argparse.Namespace, train_dir: str, cache_dir: str = "") -> None:
    """``train_net.py`` on the config with the overrides (it evaluates once, after training);
    with ``cache_dir`` the backbone features it computes are also written there."""
    cache = ["MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_DIR", cache_dir] if cache_dir else []
    cmd = [sys.executable, "train_net.py", "--config-file", args.config_file,
           "OUTPUT_DIR", train_dir] + args.opts + cache
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ), cwd=REPO)


def evaluate_again(cfg, weights: str, eval_dir: str, train_set: str = TRAIN_SET) -> dict:
    """``train_net.py --eval-only`` in this process: the checkpoint on the training tiles
    (``train_set``) and the validation tiles, with precision / recall (logged to
    ``eval_dir/log.txt``)."""
    from detectron2.utils.logger import setup_logger

    from gfocal.engine.defaults import evaluate

    cfg = cfg.clone()
    cfg.merge_from_list(["MODEL.WEIGHTS", weights, "OUTPUT_DIR", eval_dir,
                         "DATASETS.TEST", (train_set, VAL_SET),
                         "TEST.PRECISION_RECALL.ENABLED", True])
    cfg.freeze()
    os.makedirs(eval_dir, exist_ok=True)
    with open(os.path.join(eval_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    setup_logger(os.path.join(eval_dir, "log.txt"), name="detectron2", abbrev_name="d2")
    return evaluate(cfg)


def main(argv=None) -> Dict[str, float]:
    args = parse_args(argv)
    start = time.perf_counter()
    out = os.path.abspath(args.output_dir)
    os.environ["DETECTRON2_DATASETS"] = os.path.abspath(args.data_root)

    # 1. Data (before importing gfocal, which registers the splits under DETECTRON2_DATASETS).
    t = time.perf_counter()
    data_root = build_data(args)
    times = {"data_s": time.perf_counter() - t}
    print(f"[main_job] tree-crown datasets ready in {data_root} ({times['data_s']:.1f} s)", flush=True)

    from detectron2.data import DatasetCatalog

    from gfocal.config import load_config
    from gfocal.data.tree_crowns import register_tile_grid_subset
    from gfocal.evaluation import METRIC_KEYS, box_metrics, logged_box_metrics
    from gfocal.evaluation.precision_recall import results_precision_recall
    from gfocal.evaluation.tree_report import format_summary, whole_image_report
    from gfocal.visualization import draw_dataset_results

    cfg = load_config(args.config_file, args.opts)
    suffix = "_TTA" if cfg.TEST.AUG.ENABLED else ""  # the recipe's results: with TTA if set
    inference = "inference" + suffix
    cache_dir, own_cache = feature_cache_dir(cfg, args, out)
    # The evaluations and the drawing read (and add to) the features training wrote; the
    # whole-image prediction runs as a user's would, without the cache.
    eval_cfg = cfg
    if cache_dir:
        eval_cfg = cfg.clone()
        eval_cfg.merge_from_list(["MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_DIR", cache_dir,
                                  "MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_AT_TEST", True])

    # 2. Train (evaluates once at the end, into metrics.json and inference*/).
    train_dir = os.path.join(out, "train")
    t = time.perf_counter()
    train(args, train_dir, cache_dir)
    times["train_and_eval_s"] = time.perf_counter() - t
    cache_files = {"after_training": _count_files(cache_dir)}
    weights = os.path.join(train_dir, "model_final.pth")
    results_name = os.path.join(inference, VAL_SET, "coco_instances_results.json")
    metrics_json = os.path.join(train_dir, "metrics.json")
    metrics = logged_box_metrics(metrics_json, VAL_SET, suffix, len(cfg.DATASETS.TEST))

    # 3. Evaluate the written checkpoint again, on the training tiles too: their best-F1 score
    # threshold at IoU TEST.PRECISION_RECALL.IOU_THRESH is the operating point reported on
    # validation (chosen on training data, not on validation).
    eval_dir = os.path.join(out, "eval_only")
    threshold_set = register_tile_grid_subset("train", args.threshold_tile_step)
    t = time.perf_counter()
    results = evaluate_again(eval_cfg, weights, eval_dir, threshold_set)
    times["eval_only_s"] = time.perf_counter() - t
    metrics_again = box_metrics(results, VAL_SET, suffix, num_datasets=2)
    diff = max(abs(metrics[k] - metrics_again[k]) for k in METRIC_KEYS)
    if diff > args.ap_tolerance:
        raise RuntimeError(
            f"--eval-only gives {metrics_again}, the training run's evaluation gave {metrics}"
        )
    with open(os.path.join(eval_dir, inference, threshold_set, "precision_recall.json")) as f:
        train_pr = json.load(f)
    score_thresh = train_pr["best_f1_score_thresh"]
    val_pr = results_precision_recall(
        VAL_SET, os.path.join(eval_dir, results_name), train_pr["iou"], score_thresh
    )
    train_results = os.path.join(inference, threshold_set, "coco_instances_results.json")
    train_at = results_precision_recall(
        threshold_set, os.path.join(eval_dir, train_results), train_pr["iou"], score_thresh
    )
    train_metrics = box_metrics(results, threshold_set, suffix, num_datasets=2)

    # 4. Draw, 5. whole images.
    t = time.perf_counter()
    # the evaluation's own detections (EMA weights and TTA as the recipe sets them)
    drawn = draw_dataset_results(
        os.path.join(eval_dir, results_name), VAL_SET, os.path.join(out, "vis"), args.num_draw,
        score_thresh if args.draw_score_thresh is None else args.draw_score_thresh,
    )
    times["draw_s"] = time.perf_counter() - t
    cache_files["after_evaluation"] = _count_files(cache_dir)
    if own_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)  # about 1 GB
    t = time.perf_counter()
    whole = whole_image_report(cfg, weights, score_thresh, train_pr["iou"], args.whole_image_splits,
                               args.whole_image_tta)
    times["whole_image_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - start

    summary = {
        "metrics": metrics,
        "eval_only_metrics": metrics_again,
        "precision_recall": {"train_chosen": train_pr, "train": train_at, "val": val_pr},
        "train_metrics": train_metrics,
        "threshold_tiles": {"dataset": threshold_set,
                            "num_tiles": len(DatasetCatalog.get(threshold_set)),
                            "of": len(DatasetCatalog.get(TRAIN_SET))},
        "whole_image": whole,
        "times": times,
        "feature_cache": {"dir": cache_dir, "files": cache_files},
        "checkpoint": weights,
        "metrics_json": metrics_json,
        "detections": os.path.join(train_dir, results_name),
        "images": drawn,
        "seed": cfg.SEED,
        "config": os.path.abspath(args.config_file),
        "overrides": args.opts,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(format_summary(summary, os.path.join(out, "summary.json"), os.path.join(out, "vis")),
          flush=True)
    return metrics


if __name__ == "__main__":
    main()
