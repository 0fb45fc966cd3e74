#!/usr/bin/env python
"""Time saved by skipping tiles without data, on a GeoTIFF with a nodata border.

    .venv/bin/python benchmarks/nodata_skip.py --size 4096 --border 0.4 --repeats 3

Writes a ``--size`` x ``--size`` GeoTIFF (EPSG:32612, 10 cm pixels; deepforest's YELL training
image mirrored, or noise where it is absent) whose outer frame, ``--border`` of the area, holds
no data: a nodata value (0), an alpha band or an internal mask (``--kind``). Then predicts it with
:class:`gfocal.inference.TiledPredictor` with the skip (the default) and without
(``skip_nodata=False``), in alternating order for ``--repeats`` rounds, and prints the tiles
skipped, the median times, the time saved, and the detections of both runs (the run without the
skip keeps its boxes on nodata). ``--weights ""`` (default) predicts with random weights: the time
of a forward pass does not depend on them.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("nodata", "alpha", "mask")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(REPO, "configs/trees/gfl_lite0_trees.yaml"))
    p.add_argument("--weights", default="", help="checkpoint ('' : random weights)")
    p.add_argument("--size", type=int, default=4096, help="side of the square GeoTIFF in pixels")
    p.add_argument("--border", type=float, default=0.4, help="fraction of the area without data")
    p.add_argument("--kind", choices=KINDS, default="nodata", help="how the GeoTIFF marks the border")
    p.add_argument("--patch-size", type=int, default=400)
    p.add_argument("--overlap", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="default: the device's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE", help="config overrides")
    p.add_argument("--output", default=os.path.join(REPO, "output/benchmarks/nodata_skip.json"))
    return p.parse_args(argv)


def valid_square(size: int, border: float):
    """(start, end) of the centred square that holds data when ``border`` of the area does not."""
    if not 0.0 <= border < 1.0:
        raise ValueError(f"--border {border} must be in [0, 1)")
    side = int(round(size * (1.0 - border) ** 0.5))
    start = (size - side) // 2
    return start, start + side


def write_border_geotiff(path: str, size: int, border: float = 0.4, kind: str = "nodata",
                         source_rgb=None, block: int = 512) -> float:
    """Write the benchmark's GeoTIFF (see the module doc), block row by block row; returns the
    fraction of its pixels without data."""
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r} must be one of {KINDS}")
    if source_rgb is None:
        source_rgb = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    h, w = source_rgb.shape[:2]
    mirrored = np.concatenate([np.concatenate([source_rgb, source_rgb[:, ::-1]], 1),
                               np.concatenate([source_rgb[::-1], source_rgb[::-1, ::-1]], 1)], 0)
    lo, hi = valid_square(size, border)
    profile = dict(driver="GTiff", width=size, height=size, count=4 if kind == "alpha" else 3,
                   dtype="uint8", tiled=True, blockxsize=block, blockysize=block, crs="EPSG:32612",
                   transform=from_origin(541000.0, 4977000.0, 0.1, 0.1))
    if kind == "nodata":
        profile["nodata"] = 0
    env = rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True)
    with env, rasterio.open(path, "w", **profile) as dst:
        if kind == "alpha":
            dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
        for y0 in range(0, size, block):
            rows = np.arange(y0, min(size, y0 + block))
            strip = mirrored[rows % (2 * h)][:, np.arange(size) % (2 * w)]
            valid = ((rows >= lo) & (rows < hi))[:, None] & ((np.arange(size) >= lo) & (np.arange(size) < hi))[None]
            if kind == "nodata":  # data pixels never all 0; the border all 0
                strip = np.where(valid[..., None], np.maximum(strip, 1), 0).astype(np.uint8)
            window = Window(0, y0, size, len(rows))
            bands = strip.transpose(2, 0, 1)
            if kind == "alpha":
                bands = np.concatenate([bands, (valid * 255).astype(np.uint8)[None]])
            dst.write(bands, window=window)
            if kind == "mask":
                dst.write_mask((valid * 255).astype(np.uint8), window=window)
    return 1.0 - (hi - lo) ** 2 / size ** 2


def source_image():
    """deepforest's YELL training image (RGB), or None when the data are not on this machine."""
    try:
        import cv2

        from gfocal.evaluation.whole_image import tree_whole_images

        image = cv2.imread(tree_whole_images("train")["path"])
        return None if image is None else np.ascontiguousarray(image[:, :, ::-1])
    except Exception:  # no deepforest data here: noise
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from gfocal import load_config
    from gfocal.inference import TiledPredictor, open_image

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = args.weights, args.device
    if not args.weights and cfg.get("MODEL_EMA") is not None:
        cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY = False  # random weights have no averages
    predictor = TiledPredictor(cfg, patch_size=args.patch_size, overlap=args.overlap,
                               batch_size=args.batch_size)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"border_{args.kind}.tif")
        fraction = write_border_geotiff(path, args.size, args.border, args.kind, source_image())
        for r in range(args.repeats):
            for skip in ((True, False) if r % 2 == 0 else (False, True)):
                predictor.skip_nodata = skip
                with open_image(path) as reader:
                    start = time.perf_counter()
                    result = predictor(reader)
                    took = time.perf_counter() - start
                run = runs.setdefault("skip" if skip else "no_skip", {"seconds": []})
                run["seconds"].append(took)
                run.update(tiles=result.num_tiles, skipped=result.num_skipped,
                           detections=len(result.instances))
    for run in runs.values():
        run["median_s"] = statistics.median(run["seconds"])
    skip, full = runs["skip"], runs["no_skip"]
    report = {
        "image": f"{args.size}x{args.size} GeoTIFF, {100 * fraction:.1f}% without data ({args.kind})",
        "weights": args.weights or "random", "threads": args.threads, "patch_size": args.patch_size,
        "overlap": args.overlap, "batch_size": predictor.batch_size,
        "backend": predictor.backend_name, "repeats": args.repeats, "runs": runs,
        "time_saved_s": full["median_s"] - skip["median_s"],
        "time_saved_fraction": 1.0 - skip["median_s"] / full["median_s"],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{report['image']}, patch {args.patch_size}, overlap {args.overlap}, batch "
          f"{report['batch_size']}, backend {report['backend']}, "
          f"{args.threads} threads, {args.repeats} rounds, weights: {report['weights']}")
    print("| run | tiles run | tiles skipped | median s | detections |\n|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['tiles'] - run['skipped']} | {run['skipped']} | {run['median_s']:.2f} | "
              f"{run['detections']} |")
    print(f"time saved: {report['time_saved_s']:.2f} s ({100 * report['time_saved_fraction']:.0f}%)")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
