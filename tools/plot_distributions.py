#!/usr/bin/env python
"""Draw chosen detections of one image with their four edge distributions into a PNG.

    python tools/plot_distributions.py --zoo mmdet/gfl_R_50_FPN_1x --input photo.jpg \\
        --output output/distributions.png --top-k 4
"""
import argparse
import os
import sys

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image

from demo import setup_cfg, add_model_arguments
from gfocal.inference.predictor import GFLPredictor
from gfocal.visualization.distributions import draw_distributions


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--input", required=True, help="an image file")
    parser.add_argument("--output", required=True, help="the PNG to write")
    choose = parser.add_mutually_exclusive_group()
    choose.add_argument("--top-k", type=int, default=3, help="draw the K highest-scoring detections")
    choose.add_argument("--indices", type=int, nargs="+", help="draw these detections (score order)")
    parser.add_argument("--dpi", type=int, default=100)
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    cfg = setup_cfg(args, ["MODEL.GFL.OUTPUT_DISTRIBUTIONS", "True"])
    if not os.path.isfile(args.input):
        print(f"error: --input {args.input}: no such file", file=sys.stderr)
        return 2
    image = read_image(args.input, format="BGR")
    instances = GFLPredictor(cfg)(image)["instances"].to("cpu")
    if len(instances) == 0:
        print(f"error: no detection above --confidence-threshold {args.confidence_threshold}",
              file=sys.stderr)
        return 1
    indices = args.indices if args.indices is not None else list(range(min(args.top_k, len(instances))))
    names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes") if cfg.DATASETS.TEST else None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    try:
        draw_distributions(image[:, :, ::-1], instances, indices, args.output, names, args.dpi)
    except (IndexError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: detections {indices} of {len(instances)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
