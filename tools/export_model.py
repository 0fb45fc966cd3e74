#!/usr/bin/env python
"""Export GFL to TorchScript or ONNX by tracing, as detectron2's tools/deploy/export_model.py does.

    python tools/export_model.py --config-file configs/gfl_R_50_FPN_1x.yaml --format torchscript \\
        --output output/export MODEL.WEIGHTS model_final.pth
    python tools/export_model.py --config-file configs/gfl_R_50_FPN_1x.yaml --format onnx \\
        --sample-image input.jpg --output output/export MODEL.WEIGHTS model_final.pth

The whole model is traced: input normalisation, backbone, head, the integral, per-level top-k,
box decoding, class-wise NMS (``torchvision::nms``; ONNX ``NonMaxSuppression``) and the final
top detections. The exported model takes one (3, H, W) float image in the config's
``INPUT.FORMAT`` (0-255, already resized as ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` would) and
returns ``boxes (K, 4), classes (K,), scores (K,)``. Height and width may differ from the sample's.
The exported weights are the evaluated ones (``gfocal/model_io/weights.py``: the EMA averages
with ``MODEL_EMA.ENABLED`` and ``USE_EMA_WEIGHTS_FOR_EVAL_ONLY``, else the raw weights).

``INPUT.FORMAT`` and the test sizes are written beside the model (``model.json``) and into the
ONNX file's metadata, so that a runtime feeds the right channel order and size (docs/faq.md).
After export, the exported model is run on the sample image and its detections are compared with
eager PyTorch's (``--atol``); the command fails if they differ more.
"""

import argparse
import logging
import os

import torch

from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import gfocal  # noqa: F401  (registers GFL)
from gfocal import load_config
from gfocal.model_io.export import (
    compare_detections,
    export_metadata,
    export_onnx,
    export_torchscript,
    write_metadata,
)
from gfocal.model_io.weights import load_evaluated_weights

logger = logging.getLogger("gfocal.model_io.export")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--format", choices=["torchscript", "onnx"], required=True)
    p.add_argument(
        "--export-method",
        choices=["tracing"],
        default="tracing",
        help="tracing (the model's Instances outputs are flattened by TracingAdapter)",
    )
    p.add_argument("--output", default="output/export", help="output folder")
    p.add_argument(
        "--sample-image",
        default="",
        help="image to trace with (default: random, --height x --width)",
    )
    p.add_argument("--height", type=int, default=0,
                   help="random sample image height (default: the config's INPUT.MIN_SIZE_TEST)")
    p.add_argument("--width", type=int, default=0,
                   help="random sample image width (default: the config's INPUT.MIN_SIZE_TEST)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument(
        "--static-size", action="store_true", help="ONNX: fix the input height and width"
    )
    p.add_argument(
        "--atol", type=float, default=1e-3, help="max |box| and |score| difference allowed vs eager"
    )
    p.add_argument("--no-check", action="store_true", help="skip running the exported model")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def sample_image(cfg, args) -> torch.Tensor:
    """The sample image as the exported model expects it: (3, H, W) float, resized for testing."""
    if not args.sample_image:
        g = torch.Generator().manual_seed(0)
        size = int(export_metadata(cfg)["min_size_test"])
        shape = (3, args.height or size, args.width or size)
        return torch.randint(0, 256, shape, generator=g).float()
    if not os.path.isfile(args.sample_image):
        raise SystemExit(f"--sample-image {args.sample_image}: no such file")
    image = detection_utils.read_image(args.sample_image, format=cfg.INPUT.FORMAT)
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def run_exported(fmt: str, path: str, image: torch.Tensor):
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(path)(image)
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image.numpy()})


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logger(name="gfocal")
    cfg = setup_cfg(args)
    if cfg.MODEL.DEVICE != "cpu":
        logger.info("exporting on %s", cfg.MODEL.DEVICE)
    model = build_model(cfg)
    # The evaluated weights (the EMA averages with MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY), as
    # evaluation and every predictor: gfocal/model_io/weights.py.
    which = load_evaluated_weights(cfg, model, cfg.MODEL.WEIGHTS)
    logger.info("exporting the %s weights of %s", which, cfg.MODEL.WEIGHTS or "(none)")
    model.eval()
    image = sample_image(cfg, args).to(model.device)

    with torch.no_grad():
        instances = model([{"image": image}])[0]["instances"]
    if len(instances) == 0:
        # Traced without a single candidate box, the graph keeps empty shapes as constants and
        # fails (or is wrong) on images that have some.
        raise SystemExit(
            "the sample image gives no detection above MODEL.GFL.SCORE_THRESH_TEST "
            f"({cfg.MODEL.GFL.SCORE_THRESH_TEST}): the model cannot be traced on it; give a "
            "--sample-image with objects the model finds (or check MODEL.WEIGHTS)"
        )
    name = "model.ts" if args.format == "torchscript" else "model.onnx"
    path = os.path.join(args.output, name)
    metadata = export_metadata(cfg)
    if args.format == "torchscript":
        export_torchscript(model, image, path)
        write_metadata(path, metadata)
    else:
        export_onnx(model, image, path, opset=args.opset, dynamic_size=not args.static_size,
                    metadata=metadata)
    logger.info("exported %s (input %s)", path, metadata)
    if args.no_check:
        return {"path": path}

    eager = (instances.pred_boxes.tensor, instances.pred_classes, instances.scores)
    diff = compare_detections(eager, run_exported(args.format, path, image.cpu()))
    logger.info("exported vs eager on the sample image: %s", diff)
    if max(diff["boxes"], diff["scores"]) > args.atol:
        raise SystemExit(f"exported model differs from eager by {diff} > --atol {args.atol}")
    return {"path": path, **diff}


if __name__ == "__main__":
    main()
