#!/usr/bin/env python
"""Write one of deepforest's YELL images as a GeoTIFF, to try the geo-referenced path.

    python tools/yell_geotiff.py --split val --output output/yell_val.tif

The geo-reference is illustrative: the PNG carries none. The NEON file name gives the 1 km tile
(UTM zone 12N, easting 541000, northing 4977000) and NEON's RGB mosaics have 10 cm pixels, but
where the crop lies inside that tile is not recorded; the image's top-left corner is put at the
tile's north-west corner (541000, 4978000) in EPSG:32612.
"""
import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--output", required=True, help="the GeoTIFF to write")
    p.add_argument("--crs", default="EPSG:32612")
    p.add_argument("--origin", type=float, nargs=2, default=(541000.0, 4978000.0),
                   metavar=("EASTING", "NORTHING"), help="map coordinates of the top-left corner")
    p.add_argument("--pixel-size", type=float, default=0.1, help="metres per pixel")
    args = p.parse_args(argv)

    import cv2
    import rasterio
    from rasterio.transform import from_origin

    from gfocal.data.tree_crowns import TREE_SPLITS, deepforest_data_dir

    bgr = cv2.imread(os.path.join(deepforest_data_dir(), TREE_SPLITS[args.split]))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    profile = dict(driver="GTiff", width=bgr.shape[1], height=bgr.shape[0], count=3, dtype="uint8",
                   crs=args.crs, transform=from_origin(*args.origin, args.pixel_size, args.pixel_size),
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    with rasterio.open(args.output, "w", **profile) as dst:
        dst.write(bgr[:, :, ::-1].transpose(2, 0, 1))
    print(f"wrote {args.output} ({bgr.shape[1]}x{bgr.shape[0]}, {args.crs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
