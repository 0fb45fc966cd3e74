"""Shared test helpers: a small GFL config and synthetic images with boxes."""
import os

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances

from gfocal import add_gfl_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")

# Same thread count in every test process: results of some tests depend on it.
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_cfg(config_file: str = "gfl_R_50_FPN_1x.yaml", **overrides):
    """A GFL config shrunk for CPU tests: ResNet-18 with GroupNorm, 64-channel FPN and head."""
    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, config_file))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.GFL.CONV_DIM = 64
    cfg.MODEL.GFL.NUM_CONVS = 2
    cfg.MODEL.GFL.NUM_CLASSES = 3
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def make_instances(image_size, boxes, classes) -> Instances:
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


@pytest.fixture
def toy_image():
    """A 128x160 image with two bright rectangles and their boxes (classes 0 and 2)."""
    image = torch.full((3, 128, 160), 40.0)
    image[:, 20:70, 10:60] = 220.0
    image[:, 60:120, 90:150] = 140.0
    instances = make_instances((128, 160), [[10, 20, 60, 70], [90, 60, 150, 120]], [0, 2])
    return {"image": image, "instances": instances, "height": 128, "width": 160}
