#!/usr/bin/env python
"""Box sizes and the DFL targets of a dataset under a config: per FPN level the distances from the
ATSS-assigned anchor centers to the box edges in stride units, how many the config clamps at
REG_MAX, and a REG_MAX / IN_FEATURES recommendation (gfocal/data/analysis.py).

    python tools/analyze_dataset.py --config-file configs/trees/gfl_lite0_trees.yaml \\
        --analyze neon_trees_train neon_trees_val --output output/analysis/trees
    python tools/analyze_dataset.py --config-file configs/gfl_R_50_FPN_1x.yaml \\
        --dataset mine=voc:data/xml --output output/analysis/mine
    python tools/analyze_dataset.py --config-file configs/gfl_R_50_FPN_1x.yaml --synthetic-coco 500 \\
        --output output/analysis/coco_sized

Writes ``report.json`` and ``distances.png`` (a histogram per level) into ``--output``.
"""
import argparse
import json
import os
import sys

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_backbone

import gfocal
from gfocal.data.analysis import records_boxes, synthetic_coco_sized_records
from gfocal.data.analysis_report import analyze_dataset, format_report, plot_histograms
from gfocal.data.register import add_dataset_arguments, register_datasets_from_args


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the GFL config to train with")
    parser.add_argument("--analyze", nargs="+", metavar="NAME",
                        help="registered datasets to analyse together (default: the --dataset "
                        "names, else DATASETS.TRAIN)")
    parser.add_argument("--synthetic-coco", type=int, default=0, metavar="N",
                        help="analyse N synthetic 640x480 images with COCO's box-size "
                        "statistics instead")
    parser.add_argument("--seed", type=int, default=0, help="random seed of --synthetic-coco")
    parser.add_argument("--max-clamped-fraction", type=float, default=0.001,
                        help="the share of clamped edge targets a recommended REG_MAX may leave")
    parser.add_argument("--min-level-share", type=float, default=0.01,
                        help="pyramid-end levels with fewer positives than this share are dropped")
    parser.add_argument("--output", default="output/analysis",
                        help="folder for report.json and distances.png")
    add_dataset_arguments(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def _backbone_geometry(cfg):
    """Strides of the backbone's outputs and its padding, from the backbone itself (no weights)."""
    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "cpu"
    if "EFFICIENTNET_LITE" in cfg.MODEL:
        cfg.MODEL.EFFICIENTNET_LITE.WEIGHTS = ""
        cfg.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB = 0
    backbone = build_backbone(cfg)
    return {k: v.stride for k, v in backbone.output_shape().items()}, backbone.size_divisibility


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    registered = register_datasets_from_args(args)
    cfg = gfocal.load_config(args.config_file, args.opts)
    if args.synthetic_coco:
        names = [f"synthetic COCO-sized ({args.synthetic_coco} images, seed {args.seed})"]
        records = synthetic_coco_sized_records(args.synthetic_coco, args.seed)
        images = records_boxes(records, names[0], 1)
    else:
        names = args.analyze or registered or list(cfg.DATASETS.TRAIN)
        images = []
        for name in names:
            if name not in DatasetCatalog.list():
                print(f"error: dataset {name!r} is not registered; use --dataset "
                      f"{name}=FORMAT:PATH", file=sys.stderr)
                return 2
            records = DatasetCatalog.get(name)
            classes = MetadataCatalog.get(name).get("thing_classes", None)
            num_classes = len(classes) if classes else 1 + max(
                (a["category_id"] for r in records for a in r.get("annotations", [])), default=0)
            images += records_boxes(records, name, num_classes)
    strides, size_divisibility = _backbone_geometry(cfg)
    report, stats, rec_stats = analyze_dataset(
        images, cfg, strides, size_divisibility, args.max_clamped_fraction, args.min_level_share)
    title = " + ".join(names)
    report["datasets"] = names
    report["config_file"] = args.config_file
    print(format_report(report, title))
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    png = os.path.join(args.output, "distances.png")
    plot_histograms(stats, cfg.MODEL.GFL.REG_MAX, png,
                    f"{title}: {os.path.basename(args.config_file)}",
                    recommended=report["recommended"]["REG_MAX"])
    print(f"wrote {os.path.join(args.output, 'report.json')} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
