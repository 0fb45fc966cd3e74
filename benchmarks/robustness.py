#!/usr/bin/env python
"""Whole-image AP of tree models on the validation image under photometric and scale shifts
(the robustness table of docs/small_data.md): stand-ins for other sites and cameras, which have
no labels here.

    python benchmarks/robustness.py --config-file configs/trees/gfl_lite0_trees.yaml \\
        --weights output/main_job/train/model_final.pth --output output/robustness

Each shift is applied to the whole validation YELL image (its VOC boxes scaled with it for the
scale shifts), written as a PNG, predicted whole by the tiled predictor (the config's patch
size, quarter-patch overlap, no resampling: a PNG has no ground resolution; each tile with the
config's test-time augmentation when TEST.AUG.ENABLED, or as ``--tta`` / ``--no-tta`` say) and
scored: AP, AP50, AP75 (up to 10000 detections) and P/R/F1 at IoU 0.4 at the best-F1 threshold
of that image.
Several ``--weights`` (e.g. one per seed) give one row each and their mean. The shifts
(``--shifts``, names of :data:`SHIFTS`) are detectron2's own transforms where it has one
(brightness, contrast, saturation: ``T.RandomBrightness`` & co. at a fixed factor; resize:
``T.ResizeTransform``), and OpenCV's HSV hue rotation and Gaussian blur otherwise. AP does not
depend on machine load.
"""
import argparse
import json
import os
import sys
from typing import Callable, Dict, Tuple

import numpy as np

# name -> (kind, value): "brightness"/"contrast"/"saturation": intensity factor; "hue": degrees of
# rotation; "blur": Gaussian sigma in pixels; "scale": image and box resize factor.
SHIFTS: Dict[str, Tuple[str, float]] = {
    "none": ("none", 0.0),
    "brightness-20%": ("brightness", 0.8),
    "brightness+20%": ("brightness", 1.2),
    "contrast-20%": ("contrast", 0.8),
    "contrast+20%": ("contrast", 1.2),
    "saturation-30%": ("saturation", 0.7),
    "saturation+30%": ("saturation", 1.3),
    "hue+10deg": ("hue", 10.0),
    "hue-10deg": ("hue", -10.0),
    "blur-sigma1.5": ("blur", 1.5),
    "scale-x0.75": ("scale", 0.75),
    "scale-x1.33": ("scale", 1.33),
}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default="configs/trees/gfl_lite0_trees.yaml")
    p.add_argument("--weights", nargs="+", required=True, help="trained tree models (one per seed)")
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    p.add_argument("--iou", type=float, default=0.4, help="IoU of a hit for P/R/F1")
    p.add_argument("--output", default="output/robustness")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation of each tile (default: when TEST.AUG.ENABLED, as "
                   "the main job's whole-image figures)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p


def apply_shift(rgb: np.ndarray, boxes: np.ndarray, kind: str, value: float):
    """The RGB uint8 image and its (G, 4) XYXY boxes under one shift."""
    import cv2
    from detectron2.data import transforms as T

    if kind == "none":
        return rgb, boxes
    if kind in ("brightness", "contrast", "saturation"):
        cls: Callable = {"brightness": T.RandomBrightness, "contrast": T.RandomContrast,
                         "saturation": T.RandomSaturation}[kind]
        # RandomSaturation's grey weights assume RGB order, as given here.
        out = cls(value, value).get_transform(rgb).apply_image(rgb.astype(np.float32))
        return np.clip(out, 0, 255).astype(np.uint8), boxes
    if kind == "hue":
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(value / 2)) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), boxes
    if kind == "blur":
        return cv2.GaussianBlur(rgb, (0, 0), value), boxes
    if kind == "scale":
        h, w = rgb.shape[:2]
        nh, nw = round(h * value), round(w * value)
        out = T.ResizeTransform(h, w, nh, nw).apply_image(rgb)
        return out, boxes * np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
    raise ValueError(f"unknown shift kind {kind!r}")


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    import cv2

    import gfocal
    from gfocal.evaluation.whole_image import evaluate_whole_images, tree_whole_images
    from gfocal.inference import TiledPredictor

    cfg = gfocal.load_config(args.config_file, args.opts)
    source = tree_whole_images(args.split)
    rgb = cv2.imread(source["path"])[:, :, ::-1].copy()
    os.makedirs(args.output, exist_ok=True)
    images = {}
    for name in args.shifts:
        image, boxes = apply_shift(rgb, source["gt_boxes"], *SHIFTS[name])
        path = os.path.join(args.output, f"{args.split}_{name}.png")
        cv2.imwrite(path, image[:, :, ::-1])
        images[name] = {"path": path, "gt_boxes": boxes}
    rows = {name: [] for name in args.shifts}
    tta = cfg.TEST.AUG.ENABLED if args.tta is None else args.tta
    for weights in args.weights:
        predictor = TiledPredictor(cfg, weights=weights, tta=tta)
        for name in args.shifts:
            res = evaluate_whole_images(predictor, [images[name]], args.iou)
            rows[name].append({"weights": weights, "AP": res["AP"], "AP50": res["AP50"],
                               "AP75": res["AP75"], "best_f1": res["best_f1"]})
            print(f"{weights} {name}: AP {res['AP']:.2f} AP50 {res['AP50']:.2f}", flush=True)
    with open(os.path.join(args.output, "robustness.json"), "w") as f:
        json.dump({"config": args.config_file, "opts": args.opts, "split": args.split, "tta": tta,
                   "shifts": {n: SHIFTS[n] for n in args.shifts}, "rows": rows}, f, indent=1)
    lines = ["| shift | AP per model | mean AP | mean AP50 | mean best F1 |", "|---|---|---|---|---|"]
    for name, runs in rows.items():
        ap = [r["AP"] for r in runs]
        lines.append(f"| {name} | {' / '.join(f'{a:.1f}' for a in ap)} | {np.mean(ap):.1f} | "
                     f"{np.mean([r['AP50'] for r in runs]):.1f} | "
                     f"{np.mean([r['best_f1']['f1'] for r in runs]):.1f} |")
    with open(os.path.join(args.output, "robustness.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
