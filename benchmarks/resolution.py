#!/usr/bin/env python
"""Whole-image AP of a tree model on one image at other ground resolutions, with and without
resampling to the model's ``INPUT.GSD`` (the resolution table of docs/whole_images.md).

    python benchmarks/resolution.py --config-file configs/trees/gfl_lite0_trees.yaml \\
        --weights output/main_job/train/model_final.pth --output output/resolution

The validation YELL image (10 cm pixels) is written as GeoTIFFs at each ``--gsd`` (0.05 m: 2x
upsampled, bilinear; 0.2 m: 2x downsampled, pixel area average), with an illustrative UTM 12N
transform of that pixel size, and its VOC boxes scaled alike. Each is predicted whole by the
tiled predictor (config's patch size, quarter-patch overlap): once resampled to INPUT.GSD
(rasterio resampled window reads, boxes mapped back) and once at its own pixels. Reported: AP,
AP50, AP75 (up to 10000 detections) and P/R/F1 at IoU 0.4 at the best-F1 score threshold of that
image, in ``resolution.json`` and ``resolution.md``. AP does not depend on machine load; the
timings written beside it do.
"""
import argparse
import json
import os
import sys
import time


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default="configs/trees/gfl_lite0_trees.yaml")
    p.add_argument("--weights", required=True, help="a trained tree model (the main job's)")
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--gsd", type=float, nargs="+", default=[0.1, 0.05, 0.2],
                   help="ground resolutions to write and predict, metres per pixel")
    p.add_argument("--native-gsd", type=float, default=0.1, help="the source image's (NEON: 0.1)")
    p.add_argument("--iou", type=float, default=0.4, help="IoU of a hit for P/R/F1")
    p.add_argument("--output", default="output/resolution")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p


def write_scaled_geotiff(rgb, gsd: float, native_gsd: float, path: str):
    """The image resized by ``native_gsd / gsd`` as a GeoTIFF of ``gsd`` m pixels; the factors."""
    import cv2
    import rasterio
    from affine import Affine

    height, width = rgb.shape[:2]
    size = (max(1, round(width * native_gsd / gsd)), max(1, round(height * native_gsd / gsd)))
    shrink = size[0] * size[1] < width * height
    out = rgb if size == (width, height) else cv2.resize(
        rgb, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    profile = dict(driver="GTiff", width=size[0], height=size[1], count=3, dtype="uint8",
                   crs="EPSG:32612", transform=Affine(gsd, 0, 541000.0, 0, -gsd, 4978000.0),
                   tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(out.transpose(2, 0, 1))
    return size[0] / width, size[1] / height


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    import numpy as np

    import gfocal
    from gfocal.evaluation.whole_image import evaluate_whole_images, tree_whole_images
    from gfocal.inference import TiledPredictor
    from gfocal.inference.reader import open_image

    cfg = gfocal.load_config(args.config_file, args.opts)
    if not cfg.INPUT.GSD > 0:
        raise SystemExit(f"error: {args.config_file}: INPUT.GSD is {cfg.INPUT.GSD}; set the "
                         "model's training resolution")
    predictor = TiledPredictor(cfg, weights=args.weights)
    source = tree_whole_images(args.split)
    with open_image(source["path"]) as reader:
        rgb = reader.read(0, 0, reader.width, reader.height)
    os.makedirs(args.output, exist_ok=True)
    rows = []
    for gsd in args.gsd:
        path = os.path.join(args.output, f"yell_{args.split}_{gsd:g}m.tif")
        fx, fy = write_scaled_geotiff(rgb, gsd, args.native_gsd, path)
        gt = source["gt_boxes"] * np.array([fx, fy, fx, fy], dtype=np.float32)
        for resample in (True, False):
            if gsd == cfg.INPUT.GSD and not resample:
                continue  # the same run
            predictor.resample = resample
            start = time.perf_counter()
            res = evaluate_whole_images(predictor, [{"path": path, "gt_boxes": gt}], args.iou)
            best = res["best_f1"]
            row = {"gsd": gsd, "resample": resample, "size": [round(rgb.shape[1] * fx),
                   round(rgb.shape[0] * fy)], "AP": res["AP"], "AP50": res["AP50"],
                   "AP75": res["AP75"], "best_f1": best, "seconds": time.perf_counter() - start}
            rows.append(row)
            print(f"{gsd:g} m, resample {resample}: AP {row['AP']:.1f} AP50 {row['AP50']:.1f} "
                  f"AP75 {row['AP75']:.1f}  F1 {best['f1']:.1f} at score {best['score_thresh']:.2f}",
                  flush=True)
    with open(os.path.join(args.output, "resolution.json"), "w") as f:
        json.dump({"config": args.config_file, "weights": args.weights, "split": args.split,
                   "model_gsd": cfg.INPUT.GSD, "rows": rows}, f, indent=1)
    lines = ["| image GSD | size (px) | resampled to the model's | AP | AP50 | AP75 | "
             "best F1 (P / R) at IoU 0.4 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["best_f1"]
        lines.append(f"| {r['gsd']:g} m | {r['size'][0]}x{r['size'][1]} | "
                     f"{'yes' if r['resample'] else 'no'} | {r['AP']:.1f} | {r['AP50']:.1f} | "
                     f"{r['AP75']:.1f} | {b['f1']:.1f} ({b['precision']:.1f} / {b['recall']:.1f}) |")
    with open(os.path.join(args.output, "resolution.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
