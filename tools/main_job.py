#!/usr/bin/env python
"""The main job: GFL on real aerial tree crowns, end to end on a CPU in minutes.

    .venv/bin/python tools/main_job.py [--output-dir output/main_job] [KEY VALUE ...]

1. builds the tiled COCO tree-crown datasets from the deepforest wheel (idempotent, checked);
2. trains GFL with ``train_net.py`` on ``configs/trees/gfl_lite0_trees.yaml`` (progress and ETA
   from detectron2's writers), which evaluates once at the end with COCOEvaluator;
3. evaluates the written checkpoint again with ``train_net.py --eval-only`` on the training and
   validation tiles, checks that the validation AP is the same, and reports precision / recall /
   F1 at IoU 0.4 on validation at the score threshold with the best F1 on the training tiles;
4. draws ground truth (green; border-cut crowns grey) and predictions (red, with scores) at that
   threshold on the validation tiles (detectron2's Visualizer) as PNGs;
5. writes ``summary.json`` and prints AP/AP50/AP75, precision/recall and where the files are.

Trailing ``KEY VALUE`` pairs are config overrides for both runs (e.g. ``SOLVER.MAX_ITER 20``).
"""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_KEYS = ("AP", "AP50", "AP75")


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
    p.add_argument(
        "--draw-score-thresh",
        type=float,
        default=None,
        help="score of drawn boxes (default: the best-F1 threshold chosen on the training tiles)",
    )
    p.add_argument(
        "--ap-tolerance",
        type=float,
        default=1e-6,
        help="largest AP difference accepted between the training run and --eval-only",
    )
    p.add_argument(
        "--whole-image-splits",
        type=_splits,
        default="train,val",
        help="whole YELL images predicted tile by tile (gfocal.inference) and scored whole: "
        "comma-separated train / val, or '' for none",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def recipe_inference_dir(args: argparse.Namespace) -> str:
    """Where train_net.py writes the recipe's detections: ``inference_TTA`` with TEST.AUG."""
    from detectron2.config import get_cfg

    from gfocal import add_gfl_config

    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    return "inference_TTA" if cfg.TEST.AUG.ENABLED else "inference"


def run(cmd: List[str], env: Dict[str, str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def coco_metrics(gt_json: str, results_json: str) -> Dict[str, float]:
    """AP/AP50/AP75 (in %) of a COCOEvaluator results file against the ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not os.path.isfile(results_json):
        raise FileNotFoundError(f"no detections file {results_json} (did the evaluation run?)")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        with open(results_json) as f:
            results = json.load(f)
        if not results:
            return {k: 0.0 for k in METRIC_KEYS}
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(ev.stats[i]) * 100 for i, k in enumerate(METRIC_KEYS)}


GT_COLOR = (0.1, 0.9, 0.1)  # green: ground-truth crowns
IGNORED_COLOR = (0.6, 0.6, 0.6)  # grey: crowns cut by the tile border (iscrowd, ignored)
PRED_COLOR = (1.0, 0.1, 0.1)  # red: predictions, labelled with their score


def draw_predictions(cfg, weights: str, out_dir: str, num: int, score_thresh: float) -> List[str]:
    """Run the trained model (detectron2's DefaultPredictor: test-time resize and input format
    from the config) on validation tiles and save each with its ground truth (green, border-cut
    crowns grey) and the predictions at or above ``score_thresh`` (red, with scores)."""
    import cv2

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import DefaultPredictor
    from detectron2.structures import BoxMode
    from detectron2.utils.visualizer import Visualizer

    cfg = cfg.clone()
    cfg.MODEL.WEIGHTS = weights
    predictor = DefaultPredictor(cfg)
    from gfocal.engine.hooks.ema import apply_checkpoint_ema  # the recipe's EMA weights and TTA, if set
    from gfocal.inference.test_time_augmentation import GFLWithTTA

    apply_checkpoint_ema(cfg, predictor.model, weights)
    if cfg.TEST.AUG.ENABLED:
        predictor.model = GFLWithTTA(cfg, predictor.model)
    dataset = cfg.DATASETS.TEST[-1]
    metadata = MetadataCatalog.get(dataset)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for record in DatasetCatalog.get(dataset)[:num]:
        bgr = cv2.imread(record["file_name"])
        instances = predictor(bgr)["instances"].to("cpu")
        instances = instances[instances.scores >= score_thresh]
        vis = Visualizer(bgr[:, :, ::-1], metadata, scale=1.5)
        anns = record.get("annotations", [])
        for crowd, color in ((0, GT_COLOR), (1, IGNORED_COLOR)):
            boxes = [
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in anns
                if a.get("iscrowd", 0) == crowd
            ]
            if boxes:
                vis.overlay_instances(boxes=boxes, assigned_colors=[color] * len(boxes), alpha=1.0)
        drawn = vis.overlay_instances(
            boxes=instances.pred_boxes.tensor.numpy(),
            labels=[f"{s:.2f}" for s in instances.scores.tolist()],
            assigned_colors=[PRED_COLOR] * len(instances),
            alpha=1.0,
        )
        name = os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
        path = os.path.join(out_dir, name)
        cv2.imwrite(path, drawn.get_image()[:, :, ::-1])
        paths.append(path)
    return paths


def whole_image_report(
    cfg, weights: str, score_thresh: float, iou: float, splits: List[str]
) -> Dict[str, dict]:
    """Tiled prediction of each whole YELL image (gfocal.inference: the config's test size as
    patch, a quarter patch overlap, seam rule and NMS), scored against its whole-image boxes:
    AP (up to 10000 detections per image) and P/R/F1 at ``iou`` and ``score_thresh``."""
    from gfocal.evaluation.whole_image import evaluate_whole_images, tree_whole_images
    from gfocal.inference import TiledPredictor

    predictor = TiledPredictor(cfg, weights=weights)
    return {
        split: evaluate_whole_images(predictor, [tree_whole_images(split)], iou, score_thresh)
        for split in splits
    }


def main(argv=None) -> Dict[str, float]:
    args = parse_args(argv)
    start = time.perf_counter()
    out = os.path.abspath(args.output_dir)
    os.environ["DETECTRON2_DATASETS"] = os.path.abspath(args.data_root)
    env = dict(os.environ)
    python = sys.executable

    # 1. Data (before importing gfocal, which registers the splits under DETECTRON2_DATASETS).
    from gfocal.data.tree_crowns import TileSpec, build_tree_crowns

    t = time.perf_counter()
    spec = TileSpec(args.tile_size, args.train_overlap, args.val_overlap, args.min_visible)
    data_root = build_tree_crowns(spec=spec)
    times = {"data_s": time.perf_counter() - t}
    print(f"[main_job] tree-crown datasets ready in {data_root} ({times['data_s']:.1f} s)", flush=True)

    # 2. Train (evaluates once at the end).
    train_dir = os.path.join(out, "train")
    t = time.perf_counter()
    run(
        [python, "train_net.py", "--config-file", args.config_file, "OUTPUT_DIR", train_dir]
        + args.opts,
        env,
    )
    times["train_and_eval_s"] = time.perf_counter() - t
    weights = os.path.join(train_dir, "model_final.pth")
    gt_json = os.path.join(data_root, "instances_val.json")
    inference = recipe_inference_dir(args)  # "inference_TTA" with TEST.AUG.ENABLED
    results_name = os.path.join(inference, "neon_trees_val", "coco_instances_results.json")
    metrics = coco_metrics(gt_json, os.path.join(train_dir, results_name))

    from gfocal.evaluation.precision_recall import results_precision_recall

    # 3. Evaluate the written checkpoint again, on the training tiles too: their best-F1 score
    # threshold at IoU TEST.PRECISION_RECALL.IOU_THRESH is the operating point reported on
    # validation (chosen on training data, not on validation).
    eval_dir = os.path.join(out, "eval_only")
    t = time.perf_counter()
    run(
        [python, "train_net.py", "--config-file", args.config_file, "--eval-only"]
        + args.opts
        + [
            "MODEL.WEIGHTS", weights, "OUTPUT_DIR", eval_dir,
            "DATASETS.TEST", '("neon_trees_train", "neon_trees_val")',
            "TEST.PRECISION_RECALL.ENABLED", "True",
        ],
        env,
    )
    times["eval_only_s"] = time.perf_counter() - t
    metrics_again = coco_metrics(gt_json, os.path.join(eval_dir, results_name))
    diff = max(abs(metrics[k] - metrics_again[k]) for k in METRIC_KEYS)
    if diff > args.ap_tolerance:
        raise RuntimeError(
            f"--eval-only gives {metrics_again}, the training run's evaluation gave {metrics}"
        )
    with open(os.path.join(eval_dir, inference, "neon_trees_train", "precision_recall.json")) as f:
        train_pr = json.load(f)
    score_thresh = train_pr["best_f1_score_thresh"]
    val_pr = results_precision_recall(
        "neon_trees_val", os.path.join(eval_dir, results_name), train_pr["iou"], score_thresh
    )
    train_results = os.path.join(inference, "neon_trees_train", "coco_instances_results.json")
    train_at = results_precision_recall(
        "neon_trees_train", os.path.join(eval_dir, train_results), train_pr["iou"], score_thresh
    )
    train_metrics = coco_metrics(
        os.path.join(data_root, "instances_train.json"), os.path.join(eval_dir, train_results)
    )

    # 4. Draw.
    from detectron2.config import get_cfg

    from gfocal import add_gfl_config

    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    t = time.perf_counter()
    drawn = draw_predictions(
        cfg,
        weights,
        os.path.join(out, "vis"),
        args.num_draw,
        score_thresh if args.draw_score_thresh is None else args.draw_score_thresh,
    )
    times["draw_s"] = time.perf_counter() - t
    t = time.perf_counter()
    whole = whole_image_report(cfg, weights, score_thresh, train_pr["iou"], args.whole_image_splits)
    times["whole_image_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - start

    summary = {
        "metrics": metrics,
        "eval_only_metrics": metrics_again,
        "precision_recall": {"train_chosen": train_pr, "train": train_at, "val": val_pr},
        "train_metrics": train_metrics,
        "whole_image": whole,
        "times": times,
        "checkpoint": weights,
        "metrics_json": os.path.join(train_dir, "metrics.json"),
        "detections": os.path.join(train_dir, results_name),
        "images": drawn,
        "seed": cfg.SEED,
        "config": os.path.abspath(args.config_file),
        "overrides": args.opts,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    print("\n" + "=" * 72)
    print("[main_job] GFL on NEON tree crowns (validation tiles of 2019_YELL_2_541000_4977000)")
    print("  " + "   ".join(f"{k} {metrics[k]:.1f}" for k in METRIC_KEYS)
          + f"   (seed {cfg.SEED}; another: append SEED 1)")
    print(
        "  at IoU {iou:g}, score >= {score_thresh:.2f} (best F1 on the training tiles): "
        "precision {precision:.1f}  recall {recall:.1f}  F1 {f1:.1f}".format(**val_pr)
    )
    print(
        "  training tiles (for comparison): "
        + "   ".join(f"{k} {train_metrics[k]:.1f}" for k in METRIC_KEYS)
        + "   F1 {f1:.1f}; median IoU of the hits: train {tiou:.2f}, validation {viou:.2f}".format(
            f1=train_at["f1"], tiou=train_at["median_hit_iou"], viou=val_pr["median_hit_iou"]
        )
    )
    for split, name in (("val", "validation"), ("train", "training")):
        if split in whole:
            w = whole[split]
            print(
                f"  whole {name} image (tiled prediction, stitched): "
                + "   ".join(f"{k} {w[k]:.1f}" for k in METRIC_KEYS)
                + "   P {precision:.1f}  R {recall:.1f}  F1 {f1:.1f} ({tp}/{num_gt} crowns)".format(
                    **w["at_threshold"]
                )
            )
    print(f"  --eval-only with the checkpoint: same AP (largest difference {diff:.2g})")
    print(
        "  wall time {total_s:.0f} s (data {data_s:.0f} s, train+eval {train_and_eval_s:.0f} s, "
        "eval-only {eval_only_s:.0f} s, drawing {draw_s:.0f} s)".format(**times)
    )
    print(f"  checkpoint:  {weights}")
    print(f"  metrics:     {summary['metrics_json']} and {os.path.join(out, 'summary.json')}")
    print(f"  images:      {os.path.join(out, 'vis')}/ ({len(drawn)} PNGs)")
    print("=" * 72, flush=True)
    return metrics


if __name__ == "__main__":
    main()
