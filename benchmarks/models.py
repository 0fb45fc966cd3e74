"""Build GFL and its detectron2 peers (RetinaNet, FCOS) on the same R-50-FPN for benchmarks.

Weights are random (no pretrained checkpoints can be downloaded here). So that the stage after
the head sees a realistic workload, :func:`calibrate_head` rescales each model's last head convs
and moves its classification bias above its score threshold: each large level then feeds its full
``topk_candidates`` into decoding and NMS, the same number for every model.
"""

import math
import os
from typing import Dict

import torch
from torch import nn

from detectron2 import model_zoo
from detectron2.config import get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransformLinear

import gfocal  # noqa: F401  (registers GFL)
from gfocal import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("GFL", "RetinaNet", "FCOS")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def build_gfl(depth: int = 50, num_classes: int = 80, config: str = "") -> nn.Module:
    """GFL from ``configs/gfl_R_50_FPN_1x.yaml`` (or ``config``), ResNet depth ``depth``."""
    cfg = load_config(config or os.path.join(ROOT, "configs", "gfl_R_50_FPN_1x.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.GFL.NUM_CLASSES = num_classes
    return build_model(cfg)


def build_retinanet(depth: int = 50, num_classes: int = 80) -> nn.Module:
    """detectron2's RetinaNet from its model-zoo ``retinanet_R_50_FPN_1x.yaml``."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    return build_model(cfg)


def build_fcos(depth: int = 50, num_classes: int = 80) -> nn.Module:
    """detectron2's FCOS from its model-zoo LazyConfig ``fcos_R_50_FPN_1x.py`` (not in the
    registry in detectron2 0.6)."""
    model = model_zoo.get_config("COCO-Detection/fcos_R_50_FPN_1x.py").model
    model.num_classes = num_classes
    model.backbone.bottom_up.stages.depth = depth
    return instantiate(model)


def build(name: str, depth: int = 50, num_classes: int = 80) -> nn.Module:
    builders = {"GFL": build_gfl, "RetinaNet": build_retinanet, "FCOS": build_fcos}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}, expected one of {list(builders)}")
    return builders[name](depth=depth, num_classes=num_classes)


@torch.no_grad()
def share_backbone_weights(source: nn.Module, target: nn.Module) -> int:
    """Copy every backbone tensor of ``source`` into ``target`` where name and shape agree (the
    ResNet and the FPN lateral/output convs; RetinaNet's P6 reads res5 and keeps its own), so that
    random weights give every model the same features. Returns the number of tensors copied."""
    src = source.backbone.state_dict()
    dst = target.backbone.state_dict()
    shared = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
    target.backbone.load_state_dict(shared, strict=False)
    return len(shared)


def _predictor_convs(head: nn.Module) -> Dict[str, nn.Conv2d]:
    """The last convs of a dense head: class logits, box outputs and (FCOS) centerness."""
    names = {"cls_score": "cls", "bbox_pred": "box", "box_pred": "box", "ctrness": "ctr"}
    convs = {
        role: getattr(head, n)
        for n, role in names.items()
        if isinstance(getattr(head, n, None), nn.Conv2d)
    }
    if "cls" not in convs or "box" not in convs:
        raise TypeError(f"{type(head).__name__}: no classification / box conv found")
    return convs


@torch.no_grad()
def calibrate_head(
    model: nn.Module,
    inputs,
    logit_std: float = 1.0,
    box_std: float = 0.5,
    margin: float = 0.5,
    linear_box_bias: float = 4.0,
) -> Dict[str, float]:
    """Make a randomly initialised dense detector produce a realistic workload after the head.

    Random backbones give feature maps of arbitrary magnitude, so the head's last convs are
    rescaled (one forward pass on ``inputs``) to give outputs of standard deviation ``logit_std``
    (class and centerness logits) and ``box_std`` (box outputs) around their biases. The class
    bias is then set ``margin`` logits above the model's test score threshold (FCOS: with the
    centerness at 0.5), so that more than half the scores pass it and every large level fills its
    ``topk_candidates``. FCOS's box outputs are distances that its decoder ReLUs: their bias is
    set to ``linear_box_bias`` strides so that boxes are not empty. Returns the biases set.
    """
    convs = _predictor_convs(model.head)
    stds = {}
    hooks = [
        conv.register_forward_hook(
            lambda m, i, o, role=role: stds.setdefault(role, []).append(
                float((o - m.bias.view(1, -1, 1, 1)).std())
            )
        )
        for role, conv in convs.items()
    ]
    was_training = model.training
    model.eval()
    model(inputs)
    model.train(was_training)
    for h in hooks:
        h.remove()
    for role, conv in convs.items():
        measured = max(sum(stds[role]) / len(stds[role]), 1e-12)
        conv.weight.mul_((box_std if role == "box" else logit_std) / measured)
    thresh = float(model.test_score_thresh)
    biases = {}
    if "ctr" in convs:  # FCOS: score = sqrt(sigmoid(cls) * sigmoid(ctr))
        nn.init.constant_(convs["ctr"].bias, 0.0)
        biases["ctr"] = 0.0
        cls_bias = _logit(thresh**2 / 0.5) + margin
    else:
        cls_bias = _logit(thresh) + margin
    nn.init.constant_(convs["cls"].bias, cls_bias)
    biases["cls"] = cls_bias
    if isinstance(getattr(model, "box2box_transform", None), Box2BoxTransformLinear):
        nn.init.constant_(convs["box"].bias, linear_box_bias)
        biases["box"] = linear_box_bias
    return biases


def make_inputs(batch: int = 1, height: int = 800, width: int = 1333, seed: int = 0):
    """Random uint8-range BGR images already at the test size (``height`` x ``width``)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (3, height, width), generator=g).float(),
            "height": height,
            "width": width,
        }
        for _ in range(batch)
    ]
