#!/usr/bin/env python
"""Convert an mmdetection GFL checkpoint (official GFocal repo = mmdet v1, mmdet v2, v3) to a
detectron2 checkpoint for the given config, checking every key and shape.

    python tools/convert_mmdet_gfl.py --config-file configs/mmdet/gfl_R_50_FPN_1x.yaml \\
        --input gfl_r50_fpn_1x_coco_20200629_121244-25944287.pth \\
        --output output/converted/gfl_R_50_FPN_1x.pth
"""
import argparse
import os
import sys


import gfocal
from gfocal.model_io.conversion import ConversionError, convert_mmdet_gfl_checkpoint


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="detectron2 GFL config (configs/mmdet/...)")
    parser.add_argument("--input", required=True, help="mmdetection GFL checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="where to write the detectron2 checkpoint")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load the input with torch.load(weights_only=False): only for files you trust",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    cfg = gfocal.load_config(args.config_file, args.opts)
    if not os.path.isfile(args.input):
        print(f"error: --input {args.input}: no such file", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    try:
        info = convert_mmdet_gfl_checkpoint(args.input, args.output, cfg, args.allow_pickle)
    except ConversionError as e:
        print(f"error: {args.input}: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output}: {info.num_classes} classes, reg_max {info.reg_max}, "
        f"{info.num_convs} convs per tower, {info.num_levels} levels; "
        f"{len(info.dropped)} bookkeeping keys dropped (num_batches_tracked, integral projection)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
