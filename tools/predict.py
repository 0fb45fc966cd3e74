#!/usr/bin/env python
"""Tiled prediction of whole images (large PNG / JPEG / TIFF, geo-referenced GeoTIFF).

    python tools/predict.py --config-file configs/trees/gfl_lite0_trees.yaml \\
        --weights output/main_job/train/model_final.pth --output output/predict/ orthomosaic.tif photos/

Writes into --output: detections.csv (deepforest's columns image_path,xmin,ymin,xmax,ymax,label
plus score), coco_results.json with coco_images.json (the image ids), <image>.geojson (polygons in
the image's CRS, for geo-referenced input) and <image>_drawing.png (downscaled when large).

Tiles without data (nodata value, alpha band, internal mask; --nodata VALUE) are skipped and boxes
centred on nodata dropped. --num-gpus N [--num-machines M --machine-rank R --dist-url tcp://H:P]
shares images and tiles among N processes per machine (CPU: gloo; CUDA: one GPU each); rank 0
merges and writes. --skip-unreadable leaves out unreadable inputs, listed in skipped_inputs.csv.
"""
import argparse
import os
import sys
import time
from typing import List


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, help="a GFL yacs config")
    p.add_argument("--weights", help="checkpoint (default: the config's MODEL.WEIGHTS)")
    p.add_argument("--output", required=True, help="folder for the results")
    p.add_argument("inputs", nargs="+", help="image files or folders (PNG, JPEG, TIFF/GeoTIFF)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="tile side in pixels (default: the config's INPUT.MIN_SIZE_TEST)")
    p.add_argument("--overlap", type=int, default=None,
                   help="overlap of neighbouring tiles in pixels (default: a quarter of the patch)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per forward pass (default: the device's, docs/whole_images.md)")
    p.add_argument("--max-dets", type=int, default=10000, help="detections kept per whole image")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="lowest score predicted and written (default: MODEL.GFL.SCORE_THRESH_TEST)")
    p.add_argument("--draw-score-thresh", type=float, default=0.3, help="lowest score drawn")
    p.add_argument("--draw-max-side", type=int, default=2048, help="longer side of the drawing")
    p.add_argument("--edge-margin", type=float, default=2.0,
                   help="seam rule: pixels within which a box touches a tile edge (-1: NMS only)")
    p.add_argument("--gsd", type=float, default=None, metavar="METRES",
                   help="ground sample distance of the inputs in metres per pixel (plain PNG/JPEG, "
                   "e.g. a drone photo; replaces a GeoTIFF's): each image is resampled to the "
                   "model's INPUT.GSD and the boxes mapped back to its own pixels")
    p.add_argument("--no-resample", action="store_true",
                   help="predict at the images' own pixel size even when their GSD differs from "
                   "the model's INPUT.GSD")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="bf16: autocast of backbone and head (default: the device's)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC weights and input (default: the device's)")
    p.add_argument("--backend", default=None, choices=("torch", "onnxruntime", "openvino"),
                   help="where backbone and head run (default: the device's; openvino on CPU)")
    p.add_argument("--tile-max-dets", type=int, default=1000,
                   help="detections kept per tile before the merge")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation of every tile (the config's TEST.AUG sizes, "
                   "symmetries and merge): slower by the number of versions")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (sets MODEL.DEVICE)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --output")
    p.add_argument("--skip-nodata", action=argparse.BooleanOptionalAction, default=True,
                   help="skip tiles without data and drop boxes centred on nodata (the image's "
                   "nodata value, alpha band or mask)")
    p.add_argument("--nodata", type=float, default=None,
                   help="a pixel value (all bands) that also means no data, e.g. 0 for black borders")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out unreadable inputs (listed in skipped_inputs.csv) instead of refusing the run")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes per machine: one per GPU (CUDA), or CPU processes with --device cpu")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0 to --num-machines - 1")
    p.add_argument("--dist-url", default="auto",
                   help="tcp://HOST:PORT of machine 0 (auto: a free local port; one machine only)")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="config overrides, e.g. --opts MODEL.GFL.NMS_THRESH_TEST 0.5")
    return p


def output_names(paths: List[str], skip_unreadable: bool = False) -> List[str]:
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) != len(stems):
        raise SystemExit("error: two inputs have the same file name stem; their outputs would collide")
    return (["detections.csv", "coco_results.json", "coco_images.json"]
            + (["skipped_inputs.csv"] if skip_unreadable else [])
            + [s + ".geojson" for s in stems] + [s + "_drawing.png" for s in stems])


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    from gfocal.inference.reader import expand_image_inputs

    try:
        paths = expand_image_inputs(args.inputs)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    taken = [n for n in output_names(paths, args.skip_unreadable) if os.path.exists(os.path.join(args.output, n))]
    if taken and not args.overwrite:
        raise SystemExit(f"error: --output {args.output} already holds results ({', '.join(taken[:3])}"
                         f"{', ...' if len(taken) > 3 else ''}); pass --overwrite to replace them")
    if args.config_file and not os.path.isfile(args.config_file):
        raise SystemExit(f"error: --config-file {args.config_file}: no such file")
    if args.weights and not os.path.isfile(args.weights):
        raise SystemExit(f"error: --weights {args.weights}: no such file")
    if args.patch_size is not None and args.overlap is not None and not 0 <= args.overlap < args.patch_size:
        raise SystemExit(f"error: --overlap {args.overlap} must be in [0, --patch-size {args.patch_size})")
    if args.nodata is not None and not args.skip_nodata:
        raise SystemExit(f"error: --nodata {args.nodata:g} needs the nodata skip: drop --no-skip-nodata")
    if not 0 <= args.machine_rank < args.num_machines:
        raise SystemExit(f"error: --machine-rank {args.machine_rank} must be in [0, --num-machines {args.num_machines})")

    if args.gsd is not None and not args.gsd > 0:
        raise SystemExit(f"error: --gsd {args.gsd} must be > 0 (metres per pixel of the inputs)")

    from gfocal.inference import ImageReadError, open_image
    from gfocal.inference.nodata import check_image_nodata

    skipped = []
    for path in paths:  # fail before building the model (and before writing anything)
        try:
            with open_image(path) as reader:
                check_image_nodata(reader, args.nodata)
        except ImageReadError as e:
            if not args.skip_unreadable:
                raise SystemExit(f"error: {e}")
            skipped.append((path, str(e)))
        except ValueError as e:  # --nodata outside the band type
            raise SystemExit(f"error: {e}")
    paths = [p for p in paths if p not in {s for s, _ in skipped}]
    if not paths:
        raise SystemExit(f"error: none of the {len(skipped)} inputs can be read (--skip-unreadable)")

    import gfocal
    from gfocal.engine import launch
    from gfocal.inference.distributed import check_num_devices

    cfg = gfocal.load_config(args.config_file, args.opts)
    if args.device:
        cfg.MODEL.DEVICE = args.device
    try:
        check_num_devices(args.num_gpus, cfg.MODEL.DEVICE)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    import torch.multiprocessing as mp

    try:
        launch(run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args, cfg, paths, skipped), device=cfg.MODEL.DEVICE)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        raise SystemExit(f"error: a prediction process failed (its message is above): {e}")
    return 0


def run(args, cfg, paths: List[str], skipped: List[tuple]) -> None:
    """One process of the run (all of it with --num-gpus 1): its share of the tiles; rank 0
    merges and writes."""
    import torch

    import detectron2.utils.comm as comm
    from detectron2.data import MetadataCatalog

    from gfocal.inference import ImageReadError, TiledPredictor, writers
    from gfocal.inference.distributed import cpu_threads_per_process, predict_images

    if cfg.MODEL.DEVICE == "cpu" and comm.get_world_size() > 1:
        torch.set_num_threads(cpu_threads_per_process(args.num_gpus))
    try:
        predictor = TiledPredictor(
            cfg, weights=args.weights, patch_size=args.patch_size, overlap=args.overlap,
            batch_size=args.batch_size, max_dets=args.max_dets, score_thresh=args.score_thresh,
            precision=args.precision, channels_last=args.channels_last, edge_margin=args.edge_margin,
            backend=args.backend, tile_max_dets=args.tile_max_dets,
            skip_nodata=args.skip_nodata, nodata=args.nodata,
            resample=not args.no_resample, tta=args.tta,
        )
    except (ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes") if cfg.DATASETS.TEST else None
    names = names or [str(i) for i in range(cfg.MODEL.GFL.NUM_CLASSES)]
    main_process = comm.is_main_process()
    if main_process:
        os.makedirs(args.output, exist_ok=True)

    records = writers.PredictionRecords(args.output, names, paths, args.draw_max_side,
                                        args.draw_score_thresh)
    start = time.perf_counter()
    tiles_run = 0
    try:
        for item in predict_images(predictor, paths, args.skip_unreadable, gsd=args.gsd):
            tiles_run += item.tiles_run
            if item.error is not None:
                skipped.append((item.path, item.error))
            if item.result is None:  # skipped, or not rank 0
                continue
            found = records.add(item.path, item.reader, item.result.instances)
            megapixels = item.reader.height * item.reader.width / 1e6
            took = time.perf_counter() - start
            skip = f", {item.result.num_skipped} without data skipped" if item.result.num_skipped else ""
            print(f"{item.path}: {found} detections ({item.result.num_tiles} tiles{skip}, "
                  f"{megapixels:.1f} MP) in {took:.1f} s ({took / megapixels:.2f} s/MP)", flush=True)
            start = time.perf_counter()
    except (ImageReadError, ValueError) as e:  # unreadable; a GSD that cannot be used
        raise SystemExit(f"error: {e}")
    if comm.get_world_size() > 1:
        print(f"rank {comm.get_rank()} of {comm.get_world_size()}: ran {tiles_run} tiles", flush=True)
    if not main_process:
        return
    records.write(skipped if args.skip_unreadable else None)
    for path, error in skipped:
        print(f"skipped {path}: {error}", file=sys.stderr)
    print(f"wrote {len(records.rows)} detections of {len(records.images)} images to {args.output}/"
          + (f" ({len(skipped)} unreadable inputs skipped: {args.output}/skipped_inputs.csv)" if skipped else ""))


if __name__ == "__main__":
    sys.exit(main())
