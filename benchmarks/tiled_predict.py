#!/usr/bin/env python
"""Whole-image tiled prediction: ours vs SAHI vs a DefaultPredictor loop; a sweep of batch size,
precision, memory format and backend; a per-tile profile; memory. Fair and self-checking.

    .venv/bin/python benchmarks/tiled_predict.py --weights output/main_job/train/model_final.pth

On deepforest's 2299x2472 YELL training image, with the tree model, the same tiles (SAHI's slice
grid for ``--patch-size`` / ``--overlap``) and the same merge (class-wise NMS at the model's
threshold, no seam rule; SAHI: ``postprocess_type="NMS"``, ``match_metric="IOU"``, no standard
full-image prediction), in one process, in rotating order for ``--repeats`` rounds:

* ``ours``: :class:`gfocal.inference.TiledPredictor` with the device's defaults
  (``DEVICE_DEFAULTS``: what a user gets);
* ``ours_fp32_b1``: the same in fp32 eager, one tile per forward (the reference: the model every
  other contender runs);
* ``ours_b{N}``: fp32 eager, ``--batch-size`` tiles per forward;
* ``sahi_d2``: SAHI's ``get_sliced_prediction`` with its own ``Detectron2DetectionModel``
  (DefaultPredictor, one slice at a time: what SAHI users of detectron2 run);
* ``sahi_gfl``: ``get_sliced_prediction`` with our ``GFLDetectionModel`` (SAHI's batch_size);
* ``loop``: a Python loop of detectron2's ``DefaultPredictor`` over the tiles, then our merge.

Fairness: every contender holds the same weights (the checkpoint's EMA averages when it has them:
``gfocal.model_io.weights.load_evaluated_weights``, also into SAHI's and the loop's
DefaultPredictor), the same per-tile cap (``TILE_MAX_DETS``) and score threshold, and runs in eval
mode, where the training feature cache is bypassed (checked: no cache entry after the runs). The
report gives each contender's box agreement with the reference (IoU >= 0.9, both ways): a
contender that runs the same model below 99% makes the comparison void, and the report says so.
It records the CPU model, the thread count and the load average before and after, and says
plainly when the machine was busy (then no figure of the run is one to quote).

Ratios are medians of same-round ratios. ``--sections sweep``: each variant's time on the speed
image, its agreement with fp32 eager and its whole-image AP (``--sweep-splits``) and difference to
fp32 eager batch 1 (the exported backends: with its eager run without voting, which the
ONNX graph lacks; the table the device defaults are chosen from, docs/whole_images.md).
``--sections profile``: per tile, the time of backbone, head, decoding + NMS, and of the merge.
``--sections memory``: peak memory (VmHWM) per synthetic GeoTIFF size in a fresh process.
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
    p.add_argument("--runs", nargs="+", default=["ours", "ours_batch", "sahi_d2", "sahi_gfl", "loop"],
                   help="the contenders of the speed section (the reference ours_fp32_b1 always runs)")
    p.add_argument("--sweep-splits", nargs="+", default=["val"], choices=["train", "val"],
                   help="whole tree images on which the sweep variants are scored (AP)")
    p.add_argument("--sweep-variants", nargs="*", default=None,
                   help="names of the sweep variants to run (default: all of SWEEP_VARIANTS)")
    p.add_argument("--crop", type=int, default=0,
                   help="use only the top-left CROP x CROP pixels of the speed image (a quick check)")
    p.add_argument("--memory-sizes", type=int, nargs="*", default=[2048, 4096],
                   help="square synthetic GeoTIFFs predicted in a fresh process each")
    p.add_argument("--read-only-size", type=int, default=20000,
                   help="a synthetic GeoTIFF only read window by window, tile by tile (0: skip)")
    p.add_argument("--sections", nargs="+", default=["merge", "speed", "sweep", "profile", "memory"],
                   choices=["merge", "speed", "sweep", "profile", "memory"])
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="config overrides, e.g. MODEL.GFL.SCORE_THRESH_TEST 0.0 TEST.DETECTIONS_PER_IMAGE 30 "
                   "to give a random-weight model a trained model's box count")
    p.add_argument("--output", default=os.path.join(REPO, "output/benchmarks/tiled_predict.json"))
    p.add_argument("--memory-child", nargs=2, metavar=("TIFF", "PRECISION"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_cfg(config_file: str, weights: str, opts=()):
    """The tree config for the benchmark: CPU, the per-tile cap of the whole-image predictor for
    every contender (DefaultPredictor's too), and the EMA rule set by what the checkpoint holds:
    its averages when it has them, so that every contender loads the same weights."""
    import torch
    from gfocal import load_config
    from gfocal.inference.tiled import TILE_MAX_DETS

    cfg = load_config(config_file, opts)
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.DEVICE = "cpu"
    cfg.TEST.DETECTIONS_PER_IMAGE = TILE_MAX_DETS
    has_ema = "ema_state" in torch.load(weights, map_location="cpu", weights_only=False)
    cfg.MODEL_EMA.ENABLED = cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY = has_ema
    # Off for good measure (eval mode bypasses it; checked after the runs).
    cfg.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB = 0
    cfg.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_DIR = ""
    return cfg


def machine_state(threads: int) -> dict:
    """CPU model, cores, threads used and the load average now."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "threads": threads,
            "load_avg_1_5_15": list(os.getloadavg())}


def busy_verdict(before: dict, after: dict) -> str:
    """'' on a quiet machine; else why the timings are not figures. Quiet: the 1-minute load
    before is below a quarter of the cores (+0.5), and after it is below that plus our threads."""
    quiet = 0.25 * before["cpu_count"] + 0.5
    load_before, load_after = before["load_avg_1_5_15"][0], after["load_avg_1_5_15"][0]
    reasons = []
    if load_before > quiet:
        reasons.append(f"1-min load {load_before:.2f} before the run (quiet: <= {quiet:.2f})")
    if load_after > quiet + before["threads"]:
        reasons.append(f"1-min load {load_after:.2f} after the run (ours adds ~{before['threads']}; "
                       f"quiet: <= {quiet + before['threads']:.2f})")
    return "; ".join(reasons)


def feature_cache_entries(model) -> int:
    """Entries in a backbone's training feature cache (0 when it has none)."""
    cache = getattr(getattr(getattr(model, "backbone", None), "bottom_up", None), "feature_cache", None)
    return 0 if cache is None else len(cache)


def agreement(ref_boxes, ref_scores, boxes, score: float = 0.3, iou: float = 0.9) -> float:
    """Fraction of reference boxes with score >= ``score`` matched (IoU >= ``iou``) by a box."""
    from gfocal.inference.agreement import box_agreement

    return box_agreement(ref_boxes, boxes, iou=iou, ref_scores=ref_scores, score=score)


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
    from gfocal.model_io.weights import load_evaluated_weights

    height, width = image_rgb.shape[:2]
    ratio = args.overlap / args.patch_size
    windows = np.asarray(get_slice_bboxes(height, width, args.patch_size, args.patch_size, False, ratio, ratio))
    grid = dict(patch_size=args.patch_size, overlap=args.overlap, edge_margin=-1.0)
    ours = TiledPredictor(cfg, **grid)  # the device's defaults
    reference = TiledPredictor(cfg, batch_size=1, precision="fp32", channels_last=False,
                               backend="torch", **grid)
    batched = TiledPredictor(model=reference.model, input_format=cfg.INPUT.FORMAT, batch_size=args.batch_size,
                             precision="fp32", channels_last=False, backend="torch", **grid)
    nms = reference.model.test_nms_thresh
    score_thresh = reference.score_thresh
    tmp_cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    tmp_cfg.write(cfg.dump())
    tmp_cfg.close()
    sahi_d2 = Detectron2DetectionModel(config_path=tmp_cfg.name, model_path=cfg.MODEL.WEIGHTS,
                                      confidence_threshold=score_thresh, device="cpu")
    # SAHI's DefaultPredictor loads the raw weights: give it the evaluated (EMA) ones, as ours.
    load_evaluated_weights(cfg, sahi_d2.model.model, cfg.MODEL.WEIGHTS)
    sahi_gfl = GFLDetectionModel(model=batched, confidence_threshold=score_thresh, device="cpu")
    default = DefaultPredictor(cfg)
    load_evaluated_weights(cfg, default.model, cfg.MODEL.WEIGHTS)
    bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
    # SAHI's detectron2 wrapper flips an RGB array to BGR only for a BGR model and passes it on to
    # DefaultPredictor, which takes BGR: an RGB model (the tree model) would get BGR. Give it BGR
    # then, so that it runs the same model on the same pixels as the others.
    sahi_d2_image = bgr if cfg.INPUT.FORMAT == "RGB" else image_rgb
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
                                      reference.max_dets, -1.0)
        return b.numpy(), s.numpy()

    def run_tiled(predictor):
        inst = predictor(image_rgb, windows=windows).instances
        return inst.pred_boxes.tensor.numpy(), inst.scores.numpy()

    batch_name = f"ours_b{args.batch_size}"
    runners = {
        "ours": lambda: run_tiled(ours),
        "ours_fp32_b1": lambda: run_tiled(reference),
        batch_name: lambda: run_tiled(batched),
        "sahi_d2": lambda: sahi_arrays(get_sliced_prediction(sahi_d2_image, sahi_d2, **sahi_kwargs).object_prediction_list),
        "sahi_gfl": lambda: sahi_arrays(get_sliced_prediction(image_rgb, sahi_gfl, batch_size=args.batch_size,
                                                              **sahi_kwargs).object_prediction_list),
        "loop": loop,
    }
    wanted = {batch_name if r == "ours_batch" else r for r in args.runs} | {"ours", "ours_fp32_b1"}
    runners = {k: v for k, v in runners.items() if k in wanted}
    # Which contenders run exactly the reference's model (fp32 eager, same weights and cap).
    # (an fp32 runtime backend, or NHWC, runs the same model up to float rounding)
    same_model = {k: k != "ours" or ours.precision == "fp32" for k in runners}
    outputs = {}

    def run(name):
        start, cpu = time.perf_counter(), time.process_time()
        outputs[name] = runners[name]()
        return {"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}

    warm = image_rgb[: args.patch_size, : args.patch_size]
    for predictor in (ours, reference, batched):  # warm-up (oneDNN primitive creation)
        predictor.predict_tiles([warm] * predictor.batch_size)
    default(np.ascontiguousarray(warm[:, :, ::-1]))
    sahi_d2.model(np.ascontiguousarray(warm[:, :, ::-1]))
    results = interleaved(list(runners), args.repeats, run)
    ref_b, ref_s = outputs["ours_fp32_b1"]
    megapixels = height * width / 1e6
    table = {}
    void = []
    for name in runners:
        b, s = outputs[name]
        row = {
            "median_s": median_of(results[name], "s"),
            "s_per_megapixel": median_of(results[name], "s") / megapixels,
            "time_vs_ours": paired_ratio(results[name], results["ours"], "s"),
            "median_cpu_s": median_of(results[name], "cpu_s"),
            "cpu_time_vs_ours": paired_ratio(results[name], results["ours"], "cpu_s"),
            "detections": int(len(s)),
            "same_model_as_reference": same_model[name],
            # all boxes (score >= 0), so that it also means something for a random-weight model
            "reference_boxes_found": agreement(ref_b, ref_s, b, score=0.0),
            "its_boxes_found_by_reference": agreement(b, s, ref_b, score=0.0),
        }
        row["agreement"] = min(row["reference_boxes_found"], row["its_boxes_found_by_reference"])
        if same_model[name] and row["agreement"] < 0.99:
            void.append(f"{name}: {100 * row['agreement']:.1f}% box agreement with ours_fp32_b1")
        table[name] = row
    # A fresh process-like first call: building the default predictor, then one whole image
    # (includes a runtime backend's export and compilation of backbone and head).
    start = time.perf_counter()
    TiledPredictor(cfg, **grid)(image_rgb, windows=windows)
    cold_s = time.perf_counter() - start
    cache_entries = {"ours": feature_cache_entries(ours.model), "reference": feature_cache_entries(reference.model),
                     "sahi_d2": feature_cache_entries(sahi_d2.model.model), "loop": feature_cache_entries(default.model)}
    if any(cache_entries.values()):
        void.append(f"training feature cache entries after the runs: {cache_entries}")
    os.unlink(tmp_cfg.name)
    return {"image_hw": [height, width], "tiles": int(len(windows)), "megapixels": megapixels,
            "batch_size": args.batch_size, "repeats": args.repeats, "runs": table,
            "ours_first_call_s": cold_s,
            "ours_settings": {"batch_size": ours.batch_size, "precision": ours.precision,
                              "channels_last": ours.channels_last, "backend": ours.backend_name},
            "weights": "ema" if cfg.MODEL_EMA.ENABLED else "raw", "feature_cache_entries": cache_entries,
            "void": void}


# ----------------------------------------------------------------------------------------------
SWEEP_VARIANTS = {
    "fp32_b1": dict(batch_size=1),
    "fp32_b8": dict(batch_size=8),
    "fp32_b1_channels_last": dict(batch_size=1, channels_last=True),
    "fp32_b8_channels_last": dict(batch_size=8, channels_last=True),
    "bf16_b1": dict(batch_size=1, precision="bf16"),
    "bf16_b8": dict(batch_size=8, precision="bf16"),
    "bf16_b1_channels_last": dict(batch_size=1, precision="bf16", channels_last=True),
    "bf16_b8_channels_last": dict(batch_size=8, precision="bf16", channels_last=True),
    # ONNX Runtime / OpenVINO run backbone and head; decoding, voting and NMS stay in PyTorch.
    "onnxruntime_b1": dict(batch_size=1, backend="onnxruntime"),
    "openvino_b1": dict(batch_size=1, backend="openvino"),
    "openvino_bf16_b1": dict(batch_size=1, backend="openvino", precision="bf16"),
    "torch.compile_b1": dict(batch_size=1, compile=True),
}


def _compile(predictor) -> None:
    """``torch.compile`` of backbone and head in place (decoding and NMS stay eager: their shapes
    depend on the data); the first call compiles."""
    predictor.model.backbone.compile()
    predictor.model.head.compile()


def sweep_section(args, cfg, image_rgb):
    """Every variant on the speed image (interleaved repeats) and on the whole ``--sweep-splits``
    images (AP); agreement of each with fp32 eager batch 1. A variant that cannot be built or run
    here is listed with its error instead."""
    from gfocal.evaluation.whole_image import coco_ap, tree_whole_images
    from gfocal.inference import TiledPredictor

    names = args.sweep_variants or list(SWEEP_VARIANTS)
    unknown = sorted(set(names) - set(SWEEP_VARIANTS))
    if unknown:
        raise SystemExit(f"--sweep-variants {unknown}: choose from {list(SWEEP_VARIANTS)}")
    names = ["fp32_b1"] + [n for n in names if n != "fp32_b1"]
    grid = dict(patch_size=args.patch_size, overlap=args.overlap)
    predictors, failed = {}, {}
    warm = image_rgb[: args.patch_size, : args.patch_size]
    for name in names:
        options = dict(SWEEP_VARIANTS[name])
        compiled = options.pop("compile", False)
        options = {"precision": "fp32", "channels_last": False, "backend": "torch", **options}
        try:
            predictor = TiledPredictor(cfg, **grid, **options)
            if compiled:
                _compile(predictor)
            predictor.predict_tiles([warm] * predictor.batch_size)  # warm-up / compilation
            predictors[name] = predictor
        except Exception as e:  # reported, e.g. a backend or compiler missing here
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    whole = {split: tree_whole_images(split) for split in args.sweep_splits}
    outputs = {}

    def run(name):
        start, cpu = time.perf_counter(), time.process_time()
        outputs[name] = predictors[name](image_rgb).instances
        return {"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}

    results = interleaved(list(predictors), args.repeats, run)
    table = {}
    scored = {name: {split: predictors[name](im["path"]).instances for split, im in whole.items()}
              for name in predictors}
    for name in predictors:
        inst = outputs[name]
        ref_name = "fp32_b1"
        ref = outputs[ref_name]
        row = {"reference": ref_name, "median_s": median_of(results[name], "s"),
               "speedup_vs_fp32_b1": paired_ratio(results["fp32_b1"], results[name], "s"),
               "cpu_speedup_vs_fp32_b1": paired_ratio(results["fp32_b1"], results[name], "cpu_s"),
               "agreement_vs_reference": min(
                   agreement(ref.pred_boxes.tensor.numpy(), ref.scores.numpy(), inst.pred_boxes.tensor.numpy(), 0.0),
                   agreement(inst.pred_boxes.tensor.numpy(), inst.scores.numpy(), ref.pred_boxes.tensor.numpy(), 0.0))}
        for split, im in whole.items():
            det = scored[name][split]
            ap = coco_ap([{"gt_boxes": im["gt_boxes"], "boxes": det.pred_boxes.tensor.numpy(),
                           "scores": det.scores.numpy()}])
            row[f"{split}_AP"] = ap["AP"]
        table[name] = row
    for name in predictors:
        for split in whole:
            ref_name = table[name]["reference"]
            table[name][f"{split}_AP_diff"] = table[name][f"{split}_AP"] - table[ref_name][f"{split}_AP"]
    return {"variants": table, "failed": failed, "repeats": args.repeats, "splits": list(whole)}


# ----------------------------------------------------------------------------------------------
def profile_section(args, cfg, image_rgb):
    """Per tile (fp32 eager, batch 1, and the device default): median wall time of the backbone,
    the head, decoding + NMS (``forward_inference``), and the merge of the whole image per tile:
    what bounds the speed."""
    import statistics

    import torch

    from gfocal.inference import TiledPredictor, merge_detections, tile_windows
    from gfocal.inference.forward import autocast

    out = {}
    for name, options in (("fp32_b1", dict(batch_size=1, precision="fp32", channels_last=False,
                                           backend="torch")),
                          ("default", {})):
        predictor = TiledPredictor(cfg, patch_size=args.patch_size, overlap=args.overlap, **options)
        model = predictor.model
        # a runtime backend (onnxruntime, openvino) runs its own backbone and head
        parts = getattr(predictor._backend, "modules", {})
        backbone, head = parts.get("backbone", model.backbone), parts.get("head", model.head)
        grid = tile_windows(image_rgb.shape[:2], args.patch_size, args.overlap)
        times = {"backbone": [], "head": [], "decode_nms": []}
        boxes, scores, classes, wins = [], [], [], []
        with torch.no_grad(), predictor._model_thresholds():
            for w in grid.tolist():
                inputs = predictor._tile_inputs([image_rgb[w[1]:w[3], w[0]:w[2]]])
                images = model.preprocess_image(inputs)
                with autocast(model, predictor.precision):
                    t0 = time.perf_counter()
                    feats = backbone(images.tensor)
                    feats = [feats[f] for f in model.head_in_features]
                    t1 = time.perf_counter()
                    preds = head(feats)
                    t2 = time.perf_counter()
                    inst = model.forward_inference(images, feats, preds)[0]
                    t3 = time.perf_counter()
                times["backbone"].append(t1 - t0)
                times["head"].append(t2 - t1)
                times["decode_nms"].append(t3 - t2)
                boxes.append(inst.pred_boxes.tensor + torch.tensor([w[0], w[1], w[0], w[1]], dtype=torch.float32))
                scores.append(inst.scores)
                classes.append(inst.pred_classes)
                wins.append(torch.as_tensor(w, dtype=torch.float32).expand(len(inst), 4))
        t0 = time.perf_counter()
        merge_detections(torch.cat(boxes), torch.cat(scores), torch.cat(classes), torch.cat(wins),
                         torch.as_tensor(grid, dtype=torch.float32), image_rgb.shape[:2],
                         model.test_nms_thresh, predictor.max_dets, predictor.edge_margin)
        merge = time.perf_counter() - t0
        row = {k: statistics.median(v) * 1000 for k, v in times.items()}
        row["merge_per_tile"] = merge / len(grid) * 1000
        row["settings"] = (f"{predictor.backend_name}, batch {predictor.batch_size}, "
                           f"{predictor.precision}, channels_last={predictor.channels_last}")
        out[name] = row
    return {"tiles": int(len(grid)), "ms_per_tile": out}


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
    if "machine" in report:
        m = report["machine"]
        lines += [f"Machine: {m['before']['cpu_model']}, {m['before']['cpu_count']} cores, {m['before']['threads']} threads; "
                  f"load average before {m['before']['load_avg_1_5_15']}, after {m['after']['load_avg_1_5_15']}", ""]
        if m["busy"]:
            lines += [f"**The machine was busy ({m['busy']}): these timings are not figures to quote.**", ""]
    if "speed" in report:
        sp = report["speed"]
        st = sp["ours_settings"]
        lines += [f"Image {sp['image_hw'][1]}x{sp['image_hw'][0]} ({sp['megapixels']:.2f} MP), {sp['tiles']} tiles, "
                  f"{sp['repeats']} interleaved repeats, {sp['weights']} weights for every contender; ours: batch "
                  f"{st['batch_size']}, {st['precision']}, channels_last={st['channels_last']}, backend {st['backend']}", "",
                  "| run | median s | s / MP | time / ours | CPU s | CPU time / ours | detections | same model | agreement with ours_fp32_b1 (its boxes found, ours' found) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in sp["runs"].items():
            lines.append(f"| {name} | {r['median_s']:.2f} | {r['s_per_megapixel']:.2f} | {r['time_vs_ours']:.2f} | "
                         f"{r['median_cpu_s']:.1f} | {r['cpu_time_vs_ours']:.2f} | {r['detections']} | "
                         f"{'yes' if r['same_model_as_reference'] else 'no'} | "
                         f"{100 * r['its_boxes_found_by_reference']:.1f}%, {100 * r['reference_boxes_found']:.1f}% |")
        lines += ["", f"First call of ours in a new predictor (build, export and compile, one image): "
                  f"{sp['ours_first_call_s']:.2f} s", ""]
        if sp["void"]:
            lines += ["**The comparison is void:** " + "; ".join(sp["void"]), ""]
    if "sweep" in report:
        sw = report["sweep"]
        splits = sw["splits"]
        lines += [f"Sweep: speed image, {sw['repeats']} interleaved repeats; AP on the whole {' + '.join(splits)} image(s)", "",
                  "| variant | median s | speed-up vs fp32 b1 | CPU speed-up | reference | boxes agreeing with it | "
                  + " | ".join(f"{s} AP (diff)" for s in splits) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(splits)]
        for name, r in sw["variants"].items():
            cells = [f"{r[s + '_AP']:.2f} ({r[s + '_AP_diff']:+.2f})" for s in splits]
            lines.append(f"| {name} | {r['median_s']:.2f} | {r['speedup_vs_fp32_b1']:.2f} | {r['cpu_speedup_vs_fp32_b1']:.2f} | "
                         f"{r['reference']} | {100 * r['agreement_vs_reference']:.1f}% | " + " | ".join(cells) + " |")
        for name, why in sw["failed"].items():
            lines.append(f"| {name} | not run here: {why} |")
        lines.append("")
    if "profile" in report:
        pf = report["profile"]
        lines += [f"Per tile ({pf['tiles']} tiles), median ms", "",
                  "| settings | backbone | head | decoding + NMS | merge (per tile) |", "|---|---|---|---|---|"]
        for name, r in pf["ms_per_tile"].items():
            lines.append(f"| {name}: {r['settings']} | {r['backbone']:.1f} | {r['head']:.1f} | {r['decode_nms']:.1f} | "
                         f"{r['merge_per_tile']:.2f} |")
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
    if args.crop:
        image_rgb = np.ascontiguousarray(image_rgb[: args.crop, : args.crop])
    cfg = load_cfg(args.config_file, args.weights, args.opts)
    report = {"weights": args.weights, "opts": args.opts, "threads": args.threads, "patch_size": args.patch_size,
              "overlap": args.overlap, "machine": {"before": machine_state(args.threads)}}
    sections = {"merge": lambda: merge_section(args, cfg), "speed": lambda: speed_section(args, cfg, image_rgb),
                "sweep": lambda: sweep_section(args, cfg, image_rgb),
                "profile": lambda: profile_section(args, cfg, image_rgb),
                "memory": lambda: memory_section(args, image_rgb)}
    for name in args.sections:
        report[name] = sections[name]()
        save_json(args.output, report)
    report["machine"]["after"] = machine_state(args.threads)
    report["machine"]["busy"] = busy_verdict(report["machine"]["before"], report["machine"]["after"])
    save_json(args.output, report)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
