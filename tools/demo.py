#!/usr/bin/env python
"""Run a GFL model on images, a folder or a video and draw its detections (detectron2's demo).

    python tools/demo.py --zoo mmdet/gfl_R_50_FPN_1x --input photos/ --output output/demo/
    python tools/demo.py --config-file configs/mmdet/gfl_R_50_FPN_1x.yaml \\
        --mmdet-weights gfl_r50_fpn_1x_coco_20200629_121244-25944287.pth --input photo.jpg --output out/
    python tools/demo.py --config-file output/mine/config.yaml --weights output/mine/model_final.pth \
        --dataset mine_val=voc:data/val_xml --input photos/ --output out/

Class names come from the metadata of ``DATASETS.TEST[0]`` (or of the first ``--dataset``):
register your own dataset with ``--dataset NAME=FORMAT:PATH[:IMAGE_ROOT]`` as in train_net.py.
"""
import argparse
import glob
import os
import sys
import time
from typing import List

import cv2
import tqdm

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

import gfocal
from gfocal import model_zoo
from gfocal.model_io.conversion import ConversionError, convert_mmdet_gfl_checkpoint
from gfocal.data.annotations import check_num_classes
from gfocal.data.formats import IMAGE_EXTENSIONS
from gfocal.data.register import add_dataset_arguments, register_datasets_from_args
from gfocal.inference.predictor import GFLPredictor

WINDOW_NAME = "GFL detections"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model choice, threshold and device flags shared by the demo and the distribution plot."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config-file", help="a GFL config (e.g. configs/mmdet/gfl_R_50_FPN_1x.yaml)")
    source.add_argument("--zoo", help=f"a gfocal.model_io.model_zoo name: {model_zoo.list_models()}")
    parser.add_argument("--weights", help="checkpoint to load (sets MODEL.WEIGHTS)")
    parser.add_argument("--mmdet-weights", help="an mmdetection GFL checkpoint: converted (once, "
                        "into --converted-dir) for the config, then loaded")
    parser.add_argument("--converted-dir", default="output/converted",
                        help="where --mmdet-weights conversions are kept")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read --mmdet-weights with pickled objects (trusted files only)")
    parser.add_argument("--cache-dir", help="model zoo cache (default $GFOCAL_CACHE or ~/.cache/gfocal)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score of a drawn detection (sets MODEL.GFL.SCORE_THRESH_TEST)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (sets MODEL.DEVICE)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")


def setup_cfg(args: argparse.Namespace, extra_opts: List[str] = ()) -> CfgNode:
    if args.zoo:
        cfg = model_zoo.get_config(args.zoo, trained=not args.weights, cache_dir=args.cache_dir)
    else:
        cfg = gfocal.load_config(args.config_file)
    cfg.merge_from_list(list(args.opts) + list(extra_opts))
    if args.weights and args.mmdet_weights:
        raise SystemExit("error: give --weights or --mmdet-weights, not both")
    if args.weights:
        cfg.MODEL.WEIGHTS = args.weights
    if args.mmdet_weights:
        cfg.MODEL.WEIGHTS = _convert_once(cfg, args)
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise SystemExit(f"error: --confidence-threshold {args.confidence_threshold} must be in [0, 1]")
    cfg.MODEL.GFL.SCORE_THRESH_TEST = args.confidence_threshold
    if args.device:
        cfg.MODEL.DEVICE = args.device
    if not cfg.MODEL.WEIGHTS:
        print("warning: no weights (MODEL.WEIGHTS is empty): the model is randomly initialised",
              file=sys.stderr)
    cfg.freeze()
    return cfg


def _convert_once(cfg: CfgNode, args: argparse.Namespace) -> str:
    """Convert ``--mmdet-weights`` for ``cfg`` unless an up-to-date conversion exists."""
    src = args.mmdet_weights
    if not os.path.isfile(src):
        raise SystemExit(f"error: --mmdet-weights {src}: no such file")
    dst = os.path.join(args.converted_dir, os.path.splitext(os.path.basename(src))[0] + "_d2.pth")
    if not os.path.isfile(dst) or os.path.getmtime(dst) < os.path.getmtime(src):
        os.makedirs(args.converted_dir, exist_ok=True)
        try:
            convert_mmdet_gfl_checkpoint(src, dst, cfg, args.allow_pickle)
        except ConversionError as e:
            raise SystemExit(f"error: --mmdet-weights {src}: {e}")
        print(f"converted {src} -> {dst}", file=sys.stderr)
    return dst


def _expand_inputs(inputs: List[str]) -> List[str]:
    paths: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(p for p in glob.glob(os.path.join(item, "*"))
                            if p.lower().endswith(IMAGE_EXTENSIONS))
        else:
            matches = sorted(glob.glob(os.path.expanduser(item)))
            if not matches:
                raise SystemExit(f"error: --input {item}: no such file")
            paths += matches
    return paths


def _output_is_folder(out: str, inputs: List[str], paths: List[str]) -> bool:
    """``--output`` names a folder (one drawing per input, under the input's file name) when it is
    one already, ends with a separator, has no image extension, or the input is a folder, a glob
    or several files; else it is the drawing's file name (one input image)."""
    return (os.path.isdir(out) or out.endswith(os.sep) or len(paths) > 1
            or not out.lower().endswith(IMAGE_EXTENSIONS)
            or any(os.path.isdir(item) or glob.has_magic(item) for item in inputs))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    media = parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--input", nargs="+", help="image files, globs ('dir/*.jpg') or folders")
    media.add_argument("--video-input", help="a video file")
    parser.add_argument("--output", help="folder for the drawn results (one image file per input, under its name), or a file name with an image extension for a single input image; without it, a window")
    add_dataset_arguments(parser)
    return parser


def class_metadata(cfg: CfgNode, registered: List[str]):
    """The metadata whose ``thing_classes`` name the model's classes: ``DATASETS.TEST[0]``, else
    the first ``--dataset``; checked against ``MODEL.GFL.NUM_CLASSES``."""
    name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
    if registered and name not in registered:
        name = registered[0]
    if name is None or name not in DatasetCatalog.list():
        print(f"warning: dataset {name!r} is not registered: detections are drawn with class ids; "
              "pass --dataset NAME=FORMAT:PATH for names", file=sys.stderr)
        return MetadataCatalog.get("__unused")
    check_num_classes([name], cfg.MODEL.GFL.NUM_CLASSES)
    return MetadataCatalog.get(name)


def _run_images(args, predictor: DefaultPredictor, metadata) -> None:
    paths = _expand_inputs(args.input)
    for path in tqdm.tqdm(paths, disable=not args.output):
        image = read_image(path, format="BGR")
        start = time.time()
        instances = predictor(image)["instances"].to("cpu")
        print(f"{path}: {len(instances)} detections in {time.time() - start:.2f}s")
        drawn = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
        result = drawn.get_image()[:, :, ::-1]
        if args.output:
            out = args.output
            if _output_is_folder(out, args.input, paths):
                os.makedirs(out, exist_ok=True)
                out = os.path.join(out, os.path.basename(path))
            else:
                os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            cv2.imwrite(out, result)
        else:
            cv2.imshow(WINDOW_NAME, result)
            if cv2.waitKey(0) == 27:  # Esc
                break


def _run_video(args, predictor: DefaultPredictor, metadata) -> None:
    video = cv2.VideoCapture(args.video_input)
    if not video.isOpened():
        raise SystemExit(f"error: --video-input {args.video_input}: cannot be opened")
    width, height = int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    writer = None
    if args.output:
        out = args.output
        if os.path.isdir(out):
            out = os.path.join(out, os.path.splitext(os.path.basename(args.video_input))[0] + ".mp4")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    visualizer = VideoVisualizer(metadata, ColorMode.IMAGE)
    while True:
        ok, frame = video.read()
        if not ok:
            break
        instances = predictor(frame)["instances"].to("cpu")
        drawn = visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
        result = drawn.get_image()[:, :, ::-1]
        if writer is not None:
            writer.write(result)
        else:
            cv2.imshow(WINDOW_NAME, result)
            if cv2.waitKey(1) == 27:
                break
    video.release()
    if writer is not None:
        writer.release()


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    registered = register_datasets_from_args(args)
    cfg = setup_cfg(args)
    metadata = class_metadata(cfg, registered)
    predictor = GFLPredictor(cfg)  # DefaultPredictor with input checks
    if args.input:
        _run_images(args, predictor, metadata)
    else:
        _run_video(args, predictor, metadata)
    return 0


if __name__ == "__main__":
    sys.exit(main())
