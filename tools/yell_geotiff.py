#!/usr/bin/env python
"""Write one of deepforest's YELL images as a GeoTIFF, to try the geo-referenced path.

    python tools/yell_geotiff.py --split val --output output/yell_val.tif
    python tools/yell_geotiff.py --split val --resample-to 0.05 --output output/yell_val_005.tif
    python tools/yell_geotiff.py --split val --resample-to 0.05 --output output/yell_val_005.png

``--resample-to METRES`` resizes the 0.1 m pixels to that ground resolution (bilinear when
enlarging, area when shrinking) and geo-references the result at that pixel size: the same scene
as a drone or another sensor would give it. An ``--output`` ending in .png writes the pixels only
(no geo-reference; predict it with ``tools/predict.py --gsd METRES``).

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
    p.add_argument("--resample-to", type=float, default=None, metavar="METRES",
                   help="resize the image from --pixel-size to this ground resolution first")
    args = p.parse_args(argv)
    if args.resample_to is not None and not args.resample_to > 0:
        p.error(f"--resample-to {args.resample_to} must be > 0 (metres per pixel)")
    if not args.pixel_size > 0:
        p.error(f"--pixel-size {args.pixel_size} must be > 0 (metres per pixel)")

    import cv2
    import rasterio
    from rasterio.transform import from_origin

    from gfocal.data.tree_crowns import TREE_SPLITS, deepforest_data_dir

    bgr = cv2.imread(os.path.join(deepforest_data_dir(), TREE_SPLITS[args.split]))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    pixel = args.pixel_size
    if args.resample_to is not None and args.resample_to != pixel:
        factor = pixel / args.resample_to
        size = (max(1, round(bgr.shape[1] * factor)), max(1, round(bgr.shape[0] * factor)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR if factor > 1 else cv2.INTER_AREA)
        pixel = args.resample_to
    if args.output.lower().endswith(".png"):
        cv2.imwrite(args.output, bgr)
        print(f"wrote {args.output} ({bgr.shape[1]}x{bgr.shape[0]}, {pixel:g} m pixels, no geo-reference)")
        return 0
    profile = dict(driver="GTiff", width=bgr.shape[1], height=bgr.shape[0], count=3, dtype="uint8",
                   crs=args.crs, transform=from_origin(*args.origin, pixel, pixel),
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    with rasterio.open(args.output, "w", **profile) as dst:
        dst.write(bgr[:, :, ::-1].transpose(2, 0, 1))
    print(f"wrote {args.output} ({bgr.shape[1]}x{bgr.shape[0]}, {pixel:g} m pixels, {args.crs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
