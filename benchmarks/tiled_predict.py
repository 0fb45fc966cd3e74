#!/usr/bin/env python
"""Whole-image tiled prediction: ours vs SAHI vs a DefaultPredictor loop; memory; precision.

    .venv/bin/python benchmarks/tiled_predict.py --weights output/main_job/train/model_final.pth

On deepforest's 2299x2472 YELL training image, with the tree model, the same tiles (SAHI's slice
grid for ``--patch-size`` / ``--overlap``) and the same merge (class-wise NMS at the model's
threshold, no seam rule; SAHI: ``postprocess_type="NMS"``, ``match_metric="IOU"``, no standard
full-image prediction), in one process, in rotating order for ``--repeats`` rounds:

* ``ours``: :class:`gfocal.inference.TiledPredictor`, ``--batch-size`` tiles per forward;
* ``ours_b1``: the same, one tile per forward;
* ``sahi_d2``: SAHI's ``get_sliced_prediction`` with its own ``Detectron2DetectionModel``
  (DefaultPredictor, one slice at a time: what SAHI users of detectron2 run);
* ``sahi_gfl``: ``get_sliced_prediction`` with our ``GFLDetectionModel`` (SAHI's batch_size);
* ``loop``: a Python loop of detectron2's ``DefaultPredictor`` over the tiles, then our merge.

Ratios are medians of same-round ratios (the CPU is shared: absolute times are noisy). Then:
peak memory (VmHWM) of ours in a fresh process per synthetic GeoTIFF size (``--memory-sizes``,
the YELL image mirrored to a square, read window by window); and fp32 vs bf16 vs channels_last:
speed ratios and, on the whole training and validation images, the AP difference to fp32 and the
fraction of fp32 boxes (score >= 0.3) matched at IoU >= 0.9 by a box of the variant.
The results go to ``--output`` (JSON) and a markdown table to stdout.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved, median_of, paired_ratio, save_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(REPO, "configs/trees/gfl_lite0_trees.yaml"))
    p.add_argument("--weights", default=os.path.join(REPO, "output/main_job/train/model_final.pth"))
    p.add_argument("--image", choices=["train", "val"], default="train",
                   help="the whole YELL image of the speed section (train: 2299x2472)")
    p.add_argument("--patch-size", type=int, default=400)
    p.add_argument("--overlap", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runs", nargs="+", default=["ours", "ours_b1", "sahi_d2", "sahi_gfl", "loop"],
                   help="the contenders of the speed section")
    p.add_argument("--precision-splits", nargs="+", default=["val"], choices=["train", "val"],
                   help="whole tree images on which the precision variants are timed and scored")
    p.add_argument("--memory-sizes", type=int, nargs="*", default=[2048, 4096],
                   help="square synthetic GeoTIFFs predicted in a fresh process each")
    p.add_argument("--read-only-size", type=int, default=20000,
                   help="a synthetic GeoTIFF only read window by window, tile by tile (0: skip)")
    p.add_argument("--sections", nargs="+", default=["merge", "speed", "precision", "memory"],
                   choices=["merge", "speed", "precision", "memory"])
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="config overrides, e.g. MODEL.GFL.SCORE_THRESH_TEST 0.0 TEST.DETECTIONS_PER_IMAGE 30 "
                   "to give a random-weight model a trained model's box count")
    p.add_argument("--output", default=os.path.join(REPO, "output/benchmarks/tiled_predict.json"))
    p.add_argument("--memory-child", nargs=2, metavar=("TIFF", "PRECISION"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_cfg(config_file: str, weights: str, opts=()):
    from gfocal import load_config

    cfg = load_config(config_file, opts)
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.DEVICE = "cpu"
    # No training-time feature cache: it would serve repeats from memory.
    cfg.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB = 0
    cfg.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_DIR = ""
    return cfg


def agreement(ref_boxes: np.ndarray, ref_scores: np.ndarray, boxes: np.ndarray, score: float = 0.3,
              iou: float = 0.9) -> float:
    """Fraction of reference boxes with score >= ``score`` matched (IoU >= ``iou``) by a box."""
    import torch
    from torchvision.ops import box_iou

    ref = ref_boxes[ref_scores >= score]
    if len(ref) == 0:
        return 1.0
    if len(boxes) == 0:
        return 0.0
    ious = box_iou(torch.as_tensor(ref, dtype=torch.float32), torch.as_tensor(boxes, dtype=torch.float32))
    return float((ious.max(1).values >= iou).float().mean())


def rss_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------------------------
def speed_section(args, cfg, image_rgb):
    import torch
    from detectron2.engine import DefaultPredictor
    from sahi.models.detectron2 import Detectron2DetectionModel
    from sahi.predict import get_sliced_prediction
    from sahi.slicing import get_slice_bboxes

    from gfocal.inference import TiledPredictor, merge_detections
    from gfocal.inference.sahi_model import GFLDetectionModel

    height, width = image_rgb.shape[:2]
    ratio = args.overlap / args.patch_size
    windows = np.asarray(get_slice_bboxes(height, width, args.patch_size, args.patch_size, False, ratio, ratio))
    ours = TiledPredictor(cfg, patch_size=args.patch_size, overlap=args.overlap,
                          batch_size=args.batch_size, edge_margin=-1.0)
    nms = ours.model.test_nms_thresh
    score_thresh = ours.model.test_score_thresh
    tmp_cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    tmp_cfg.write(cfg.dump())
    tmp_cfg.close()
    sahi_d2 = Detectron2DetectionModel(config_path=tmp_cfg.name, model_path=cfg.MODEL.WEIGHTS,
                                      confidence_threshold=score_thresh, device="cpu")
    sahi_gfl = GFLDetectionModel(model=ours, confidence_threshold=score_thresh, device="cpu")
    default = DefaultPredictor(cfg)
    bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
    sahi_kwargs = dict(slice_height=args.patch_size, slice_width=args.patch_size, overlap_height_ratio=ratio,
                       overlap_width_ratio=ratio, perform_standard_pred=False, postprocess_type="NMS",
                       postprocess_match_metric="IOU", postprocess_match_threshold=nms, verbose=0)

    def sahi_arrays(preds):
        b = np.array([p.bbox.to_xyxy() for p in preds], dtype=np.float64).reshape(-1, 4)
        return b, np.array([p.score.value for p in preds], dtype=np.float64)

    def loop():
        boxes, scores, classes, wins = [], [], [], []
        for w in windows:
            inst = default(bgr[w[1]:w[3], w[0]:w[2]])["instances"]
            boxes.append(inst.pred_boxes.tensor + torch.tensor([w[0], w[1], w[0], w[1]], dtype=torch.float32))
            scores.append(inst.scores)
            classes.append(inst.pred_classes)
            wins.append(torch.as_tensor(w, dtype=torch.float32).expand(len(inst), 4))
        b, s, _, _ = merge_detections(torch.cat(boxes), torch.cat(scores), torch.cat(classes), torch.cat(wins),
                                      torch.as_tensor(windows, dtype=torch.float32), (height, width), nms,
                                      ours.max_dets, -1.0)
        return b.numpy(), s.numpy()

    def run_ours(batch):
        ours.batch_size = batch
        inst = ours(image_rgb, windows=windows).instances
        ours.batch_size = args.batch_size
        return inst.pred_boxes.tensor.numpy(), inst.scores.numpy()

    runners = {
        "ours": lambda: run_ours(args.batch_size),
        "ours_b1": lambda: run_ours(1),
        "sahi_d2": lambda: sahi_arrays(get_sliced_prediction(image_rgb, sahi_d2, **sahi_kwargs).object_prediction_list),
        "sahi_gfl": lambda: sahi_arrays(get_sliced_prediction(image_rgb, sahi_gfl, batch_size=args.batch_size,
                                                              **sahi_kwargs).object_prediction_list),
        "loop": loop,
    }
    outputs = {}

    def run(name):
        start, cpu = time.perf_counter(), time.process_time()
        outputs[name] = runners[name]()
        return {"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}

    runners = {k: v for k, v in runners.items() if k in args.runs or k == "ours"}
    warm = image_rgb[: args.patch_size, : args.patch_size]
    ours.predict_tiles([warm] * args.batch_size)  # warm-up (oneDNN primitive creation)
    ours.predict_tiles([warm])
    default(np.ascontiguousarray(warm[:, :, ::-1]))
    results = interleaved(list(runners), args.repeats, run)
    ref_b, ref_s = outputs["ours"]
    megapixels = height * width / 1e6
    table = {}
    for name in runners:
        b, s = outputs[name]
        table[name] = {
            "median_s": median_of(results[name], "s"),
            "s_per_megapixel": median_of(results[name], "s") / megapixels,
            "time_vs_ours": paired_ratio(results[name], results["ours"], "s"),
            "median_cpu_s": median_of(results[name], "cpu_s"),
            "cpu_time_vs_ours": paired_ratio(results[name], results["ours"], "cpu_s"),
            "detections": int(len(s)),
            # all boxes (score >= 0), so that it also means something for a random-weight model
            "agreement_with_ours": agreement(ref_b, ref_s, b, score=0.0),
            "ours_agreement_with_it": agreement(b, s, ref_b, score=0.0),
        }
    os.unlink(tmp_cfg.name)
    return {"image_hw": [height, width], "tiles": int(len(windows)), "megapixels": megapixels,
            "batch_size": args.batch_size, "repeats": args.repeats, "runs": table}


# ----------------------------------------------------------------------------------------------
def merge_section(args, cfg):
    """Seam rules on the whole validation image, from one set of per-tile predictions (our grid):
    ours (seam rule + NMS), NMS only, and SAHI's default merge (GREEDYNMM, IOS 0.5; without its
    extra full-image prediction) and SAHI's NMS with IOS 0.5, each scored as a whole image."""
    import torch
    from sahi.postprocess.combine import GreedyNMMPostprocess, NMSPostprocess
    from sahi.prediction import ObjectPrediction

    from gfocal.evaluation.precision_recall import best_f1_threshold
    from gfocal.evaluation.whole_image import coco_ap, tree_whole_images
    from gfocal.inference import TiledPredictor, merge_detections, open_image, tile_windows

    im = tree_whole_images("val")
    predictor = TiledPredictor(cfg, patch_size=args.patch_size, overlap=args.overlap, batch_size=args.batch_size)
    with open_image(im["path"]) as reader:
        hw = (reader.height, reader.width)
        grid = tile_windows(hw, args.patch_size, args.overlap)
        tiles = []
        for i in range(0, len(grid), args.batch_size):
            chunk = grid[i:i + args.batch_size]
            tiles += predictor.predict_tiles([reader.read(*w) for w in chunk.tolist()])
    boxes = torch.cat([t.pred_boxes.tensor + torch.tensor([w[0], w[1], w[0], w[1]], dtype=torch.float32)
                       for t, w in zip(tiles, grid.tolist())])
    scores = torch.cat([t.scores for t in tiles])
    classes = torch.cat([t.pred_classes for t in tiles])
    wins = torch.cat([torch.as_tensor(w, dtype=torch.float32).expand(len(t), 4) for t, w in zip(tiles, grid.tolist())])
    grid_t = torch.as_tensor(grid, dtype=torch.float32)
    nms = predictor.model.test_nms_thresh
    merged = {}
    for name, margin in (("seam rule + NMS (ours, default)", 2.0), ("NMS only", -1.0)):
        b, sc, _, _ = merge_detections(boxes, scores, classes, wins, grid_t, hw, nms, 100000, margin)
        merged[name] = (b.numpy(), sc.numpy())
    preds = [ObjectPrediction(bbox=b, category_id=int(c), category_name="Tree", score=float(x))
             for b, x, c in zip(boxes.tolist(), scores.tolist(), classes.tolist())]
    for name, post in (("SAHI default: GREEDYNMM, IOS 0.5", GreedyNMMPostprocess(0.5, "IOS", False)),
                       ("SAHI NMS, IOS 0.5", NMSPostprocess(0.5, "IOS", False))):
        kept = post(list(preds))
        merged[name] = (np.array([p.bbox.to_xyxy() for p in kept]).reshape(-1, 4),
                        np.array([p.score.value for p in kept]))
    table = {}
    for name, (b, sc) in merged.items():
        scored = [{"gt_boxes": im["gt_boxes"], "gt_crowd": np.zeros(len(im["gt_boxes"]), bool), "boxes": b, "scores": sc}]
        ap = coco_ap(scored)
        best = best_f1_threshold(scored, 0.4)
        table[name] = {**ap, "detections": int(len(sc)), "best_f1": best["f1"], "best_f1_score": best["score_thresh"],
                       "precision": best["precision"], "recall": best["recall"]}
    return {"tiles": int(len(grid)), "raw_detections": int(len(scores)), "rules": table}


# ----------------------------------------------------------------------------------------------
def precision_section(args, cfg, image_rgb):
    from gfocal.evaluation.whole_image import coco_ap, tree_whole_images
    from gfocal.inference import TiledPredictor

    variants = {"fp32": dict(), "bf16": dict(precision="bf16"), "channels_last": dict(channels_last=True),
                "bf16_channels_last": dict(precision="bf16", channels_last=True)}
    predictors = {n: TiledPredictor(cfg, patch_size=args.patch_size, overlap=args.overlap,
                                    batch_size=args.batch_size, **kw) for n, kw in variants.items()}
    whole = {split: tree_whole_images(split) for split in args.precision_splits}
    detections = {n: {} for n in variants}

    def run(name):
        start, cpu = time.perf_counter(), time.process_time()
        for split, im in whole.items():
            detections[name][split] = predictors[name](im["path"]).instances
        return {"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}

    warm = image_rgb[: args.patch_size, : args.patch_size]
    for name in variants:
        predictors[name].predict_tiles([warm])
    results = interleaved(list(variants), args.repeats, run)
    table = {}
    for name in variants:
        row = {"median_s": median_of(results[name], "s"),
               "speedup_vs_fp32": paired_ratio(results["fp32"], results[name], "s"),
               "median_cpu_s": median_of(results[name], "cpu_s"),
               "cpu_speedup_vs_fp32": paired_ratio(results["fp32"], results[name], "cpu_s")}
        for split, im in whole.items():
            inst, ref = detections[name][split], detections["fp32"][split]
            ap = coco_ap([{"gt_boxes": im["gt_boxes"], "boxes": inst.pred_boxes.tensor.numpy(),
                           "scores": inst.scores.numpy()}])
            row[f"{split}_AP"] = ap["AP"]
            row[f"{split}_AP50"] = ap["AP50"]
            row[f"{split}_agreement"] = agreement(ref.pred_boxes.tensor.numpy(), ref.scores.numpy(),
                                                  inst.pred_boxes.tensor.numpy())
        table[name] = row
    for name in variants:
        for split in whole:
            table[name][f"{split}_AP_diff"] = table[name][f"{split}_AP"] - table["fp32"][f"{split}_AP"]
    return {"variants": table, "repeats": args.repeats, "splits": list(whole),
            "megapixels": sum(np.prod(cv2_size(im["path"])) for im in whole.values()) / 1e6}


def cv2_size(path: str):
    from gfocal.inference import open_image

    with open_image(path) as reader:
        return reader.height, reader.width


# ----------------------------------------------------------------------------------------------
def write_synthetic_geotiff(path: str, source_rgb: np.ndarray, size: int) -> None:
    """A ``size`` x ``size`` GeoTIFF (EPSG:32612, 10 cm pixels) of the source mirrored, written
    block row by block row so that the writer never holds it whole either."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    h, w = source_rgb.shape[:2]
    tile = np.concatenate([np.concatenate([source_rgb, source_rgb[:, ::-1]], 1),
                           np.concatenate([source_rgb[::-1], source_rgb[::-1, ::-1]], 1)], 0)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", tiled=True,
                   blockxsize=512, blockysize=512, crs="EPSG:32612",
                   transform=from_origin(541000.0, 4977000.0, 0.1, 0.1))
    with rasterio.open(path, "w", **profile) as dst:
        for y0 in range(0, size, 512):
            rows = (np.arange(y0, min(size, y0 + 512)) % (2 * h))
            strip = tile[rows][:, np.arange(size) % (2 * w)]
            dst.write(strip.transpose(2, 0, 1), window=Window(0, y0, size, len(rows)))


def memory_child(args) -> None:
    import torch

    from gfocal.inference import TiledPredictor, open_image, tile_windows

    if args.memory_child[1] == "read-only":  # the reader alone, on a huge image
        base = rss_mb("VmRSS")
        start = time.perf_counter()
        with open_image(args.memory_child[0]) as reader:
            windows = tile_windows((reader.height, reader.width), args.patch_size, args.overlap)
            for i in range(0, len(windows), args.batch_size):
                [reader.read(*w) for w in windows[i:i + args.batch_size].tolist()]
        print(json.dumps({"baseline_rss_mb": base, "peak_rss_mb": rss_mb("VmHWM"),
                          "s": time.perf_counter() - start, "tiles": len(windows), "detections": 0}))
        return

    torch.set_num_threads(args.threads)
    cfg = load_cfg(args.config_file, args.weights, args.opts)
    predictor = TiledPredictor(cfg, patch_size=args.patch_size, overlap=args.overlap, batch_size=args.batch_size,
                               precision=args.memory_child[1])
    base = rss_mb("VmRSS")
    start = time.perf_counter()
    result = predictor(args.memory_child[0])
    took = time.perf_counter() - start
    print(json.dumps({"baseline_rss_mb": base, "peak_rss_mb": rss_mb("VmHWM"), "s": took,
                      "tiles": result.num_tiles, "detections": len(result.instances)}))


def memory_section(args, image_rgb):
    out = {}
    runs = [(size, "fp32") for size in args.memory_sizes]
    if args.read_only_size:
        runs.append((args.read_only_size, "read-only"))
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.output))) as tmp:
        for size, mode in runs:
            path = os.path.join(tmp, f"synthetic_{size}.tif")
            write_synthetic_geotiff(path, image_rgb, size)
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", path, mode,
                   "--config-file", args.config_file, "--weights", args.weights,
                   "--patch-size", str(args.patch_size), "--overlap", str(args.overlap),
                   "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["mode"] = "tiled prediction" if mode == "fp32" else "window reads only"
            row["image_mb"] = size * size * 3 / 2**20
            row["s_per_megapixel"] = row["s"] / (size * size / 1e6)
            out[f"{size} {mode}"] = row
            os.remove(path)
    return out


# ----------------------------------------------------------------------------------------------
def markdown(report) -> str:
    lines = []
    if "merge" in report:
        mg = report["merge"]
        lines += [f"Whole validation image, {mg['tiles']} tiles, {mg['raw_detections']} tile detections", "",
                  "| merge | detections | AP | AP50 | best F1 at IoU 0.4 (score, P, R) |", "|---|---|---|---|---|"]
        for name, r in mg["rules"].items():
            lines.append(f"| {name} | {r['detections']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['best_f1']:.1f} "
                         f"({r['best_f1_score']:.2f}, {r['precision']:.1f}, {r['recall']:.1f}) |")
        lines.append("")
    if "speed" in report:
        sp = report["speed"]
        lines += [f"Image {sp['image_hw'][1]}x{sp['image_hw'][0]} ({sp['megapixels']:.2f} MP), {sp['tiles']} tiles, "
                  f"batch {sp['batch_size']}, {sp['repeats']} interleaved repeats", "",
                  "| run | median s | s / MP | time / ours | CPU s | CPU time / ours | detections | ours' boxes found (IoU>=0.9), its boxes found by ours |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in sp["runs"].items():
            lines.append(f"| {name} | {r['median_s']:.2f} | {r['s_per_megapixel']:.2f} | {r['time_vs_ours']:.2f} | "
                         f"{r['median_cpu_s']:.1f} | {r['cpu_time_vs_ours']:.2f} | "
                         f"{r['detections']} | {100 * r['agreement_with_ours']:.1f}%, {100 * r['ours_agreement_with_it']:.1f}% |")
        lines.append("")
    if "precision" in report:
        pr = report["precision"]
        splits = pr["splits"]
        lines += [f"Whole {' + '.join(splits)} image(s), {pr['megapixels']:.2f} MP, {pr['repeats']} interleaved repeats", "",
                  "| variant | median s | speed-up vs fp32 | CPU speed-up | " + " | ".join(f"{s} AP (diff to fp32) | {s} boxes agreeing" for s in splits) + " |",
                  "|---|---|---|---|" + "---|---|" * len(splits)]
        for name, r in pr["variants"].items():
            cells = [f"{r[s + '_AP']:.2f} ({r[s + '_AP_diff']:+.2f}) | {100 * r[s + '_agreement']:.1f}%" for s in splits]
            lines.append(f"| {name} | {r['median_s']:.2f} | {r['speedup_vs_fp32']:.2f} | {r['cpu_speedup_vs_fp32']:.2f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    if "memory" in report:
        lines += ["| GeoTIFF | what | image MB (uncompressed) | RSS before MB | peak RSS MB | tiles | s | s / MP |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, r in report["memory"].items():
            size = key.split()[0]
            lines.append(f"| {size}x{size} | {r['mode']} | {r['image_mb']:.0f} | {r['baseline_rss_mb']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['tiles']} | {r['s']:.1f} | {r['s_per_megapixel']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    if not os.path.isfile(args.weights):
        raise SystemExit(f"error: --weights {args.weights}: no such file (train with tools/main_job.py)")
    import cv2

    from gfocal.evaluation.whole_image import tree_whole_images

    image_rgb = np.ascontiguousarray(cv2.imread(tree_whole_images(args.image)["path"])[:, :, ::-1])
    cfg = load_cfg(args.config_file, args.weights, args.opts)
    report = {"weights": args.weights, "opts": args.opts, "threads": args.threads, "patch_size": args.patch_size, "overlap": args.overlap}
    if "merge" in args.sections:
        report["merge"] = merge_section(args, cfg)
        save_json(args.output, report)
        print(markdown(report), flush=True)
    if "speed" in args.sections:
        report["speed"] = speed_section(args, cfg, image_rgb)
        save_json(args.output, report)
    if "precision" in args.sections:
        report["precision"] = precision_section(args, cfg, image_rgb)
        save_json(args.output, report)
    if "memory" in args.sections:
        report["memory"] = memory_section(args, image_rgb)
    save_json(args.output, report)
    print(markdown(report))


if __name__ == "__main__":
    main()
