#!/usr/bin/env python
"""Cut the large images of an annotated dataset into tiles on disk: image tiles (PNG; GeoTIFF
windows with their own transform and CRS for a GeoTIFF source) plus a COCO JSON, and optionally
Pascal VOC XML and deepforest's CSV (gfocal/data/tiles.py: the grid, the box rule at the cuts).

    python tools/split_dataset.py --dataset ortho=voc:annotations/:images/ --output output/tiles \\
        --tile-size 400 --overlap 100 --empty-fraction 0.2 --formats coco,voc,csv

Writes ``<output>/<NAME>/instances.json``, ``<output>/<NAME>/images/`` and, with ``voc`` / ``csv``,
``<output>/<NAME>/voc/*.xml`` and ``<output>/<NAME>/annotations.csv``; train on them with
``--dataset NAME_tiles=coco:<output>/<NAME>/instances.json:<output>/<NAME>/images``.
"""
import argparse
import sys

FORMATS = ("coco", "voc", "csv")


def get_parser() -> argparse.ArgumentParser:
    from gfocal.data.register import add_dataset_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="folder for one sub-folder per dataset")
    p.add_argument("--tile-size", type=int, default=400, help="tile side in pixels")
    p.add_argument("--overlap", type=int, default=0, help="overlap of neighbouring tiles (px)")
    p.add_argument("--min-visible", type=float, default=0.5,
                   help="a cut box with less of its area inside the tile becomes iscrowd")
    p.add_argument("--min-side", type=float, default=2.0,
                   help="a cut box thinner than this (px) is dropped")
    p.add_argument("--empty-fraction", type=float, default=1.0,
                   help="share of the tiles without a box that are kept")
    p.add_argument("--seed", type=int, default=0, help="seed of the empty-tile choice")
    p.add_argument("--min-stride", type=int, default=32,
                   help="the model's coarsest stride: the smallest tile accepted")
    p.add_argument("--formats", default="coco", help=f"comma-separated, of {', '.join(FORMATS)}")
    add_dataset_arguments(p)
    return p


def main(argv=None) -> int:
    import os

    args = get_parser().parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or "coco" not in formats:
        raise SystemExit(f"error: --formats {args.formats!r}: give coco plus any of voc, csv")
    if not args.dataset:
        raise SystemExit("error: give at least one --dataset NAME=FORMAT:PATH[:IMAGE_ROOT]")

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from gfocal.data.register import register_datasets_from_args
    from gfocal.data.tiles import TilingSpec, write_tiles, write_voc_csv

    spec = TilingSpec(args.tile_size, args.overlap, args.min_visible, args.min_side,
                      args.empty_fraction, args.seed)
    try:
        spec.validate(args.min_stride, where="--tile")
    except ValueError as e:
        message = str(e).replace("--tile.SIZE", "--tile-size").replace("--tile.OVERLAP", "--overlap")
        for key in ("MIN_VISIBLE", "MIN_SIDE", "EMPTY_FRACTION"):
            message = message.replace(f"--tile.{key}", "--" + key.lower().replace("_", "-"))
        raise SystemExit(f"error: {message}")
    for name in register_datasets_from_args(args):
        folder = os.path.join(args.output, name)
        json_path = write_tiles(DatasetCatalog.get(name), MetadataCatalog.get(name).thing_classes,
                                spec, os.path.join(folder, "instances.json"),
                                os.path.join(folder, "images"), description=f"tiles of {name}")
        extra = write_voc_csv(json_path, [f for f in formats if f != "coco"])
        print(f"{name}: {json_path} and {os.path.join(folder, 'images')}/"
              + (f" (+ {len(extra)} VOC/CSV files)" if extra else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
