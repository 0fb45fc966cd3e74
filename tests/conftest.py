"""Shared test helpers: a small GFL config and synthetic images with boxes."""
import os

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances

from gfocal import add_gfl_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")

# GFOCAL_SIMULATE_UPSTREAM_NO_OPS=1: run the suite as on upstream detectron2 main installed without
# its compiled ops, beside a current setuptools. No registry carries upstream main, so CI simulates
# the differences that matter to this project:
# - DeformConv and ModulatedDeformConv are dummies that raise ImportError when built
#   (detectron2/layers/deform_conv.py);
# - build_optimizer passes foreach=True to SGD (detectron2/solver/build.py, since late 2022);
# - pkg_resources cannot be imported (setuptools >= 81 removed it), so detectron2.model_zoo, which
#   imports it, fails to import: the project must not need it.
# Only this process is simulated: tests that start train_net.py in a subprocess run the real 0.6.
UPSTREAM_DUMMY_MODULES = ("detectron2.layers", "detectron2.layers.deform_conv",
                          "detectron2.modeling.backbone.resnet")


def upstream_dummy_class(name: str) -> type:
    """A class that raises ImportError when built, as upstream's ``create_dummy_class`` makes."""

    def __init__(self, *args, **kwargs):
        raise ImportError(
            f"Cannot import 'detectron2._C', therefore '{name}' is not available. detectron2 is "
            "not compiled successfully, please build following the instructions!"
        )

    return type(name, (), {"__init__": __init__})


def simulate_upstream_without_ops(set_attribute=setattr) -> None:
    """Replace detectron2's deformable convolutions by upstream's dummies (``set_attribute`` may be
    ``monkeypatch.setattr`` to undo it after a test)."""
    import importlib

    for module_name in UPSTREAM_DUMMY_MODULES:
        module = importlib.import_module(module_name)
        for name in ("DeformConv", "ModulatedDeformConv"):
            set_attribute(module, name, upstream_dummy_class(name))


def upstream_build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """detectron2 main's ``build_optimizer``: 0.6's, plus ``foreach=True`` for SGD."""
    from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    optimizer = torch.optim.SGD(params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                                nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                                foreach=True)
    return maybe_add_gradient_clipping(cfg, optimizer)


UPSTREAM_BUILD_OPTIMIZER_MODULES = ("detectron2.solver", "detectron2.solver.build",
                                    "detectron2.engine.defaults")


def simulate_upstream_solver(set_attribute=setattr) -> None:
    """Make detectron2's ``build_optimizer`` main's, wherever detectron2 looks it up."""
    import importlib

    for module_name in UPSTREAM_BUILD_OPTIMIZER_MODULES:
        set_attribute(importlib.import_module(module_name), "build_optimizer",
                      upstream_build_optimizer)


def simulate_setuptools_without_pkg_resources(set_item=None) -> None:
    """``import pkg_resources`` raises ImportError, as with setuptools >= 81 (``set_item`` may be
    ``monkeypatch.setitem``)."""
    import sys

    for name in [m for m in sys.modules if m == "detectron2.model_zoo" or
                 m.startswith("detectron2.model_zoo.")]:
        if set_item is None:
            del sys.modules[name]
        else:
            set_item(sys.modules, name, None)
    if set_item is None:
        sys.modules["pkg_resources"] = None
    else:
        set_item(sys.modules, "pkg_resources", None)


if os.environ.get("GFOCAL_SIMULATE_UPSTREAM_NO_OPS") == "1":
    simulate_upstream_without_ops()
    simulate_upstream_solver()
    simulate_setuptools_without_pkg_resources()

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
