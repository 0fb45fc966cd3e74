"""Invalid configs fail at build time with a message naming the key and the allowed values."""
import importlib.util
import os

import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.utils.events import EventStorage

from conftest import REPO_ROOT, make_instances, tiny_cfg
from gfocal.config import check_gfl_config
from gfocal.modeling.backbone import build_gfl_resnet_fpn_backbone
from gfocal.modeling.losses import quality_focal_loss


def load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO_ROOT, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BAD_VALUES = [
    ("REG_MAX", 0, ">= 1"),
    ("TOPK", 0, ">= 1"),
    ("TOPK", 9.5, "integer"),
    ("NUM_CLASSES", 0, ">= 1"),
    ("NUM_CONVS", -1, ">= 0"),
    ("LOSS_CLS_WEIGHT", -1.0, ">= 0"),
    ("LOSS_BOX_WEIGHT", -0.5, ">= 0"),
    ("LOSS_DFL_WEIGHT", float("nan"), ">= 0"),
    ("LOSS_QUALITY_WEIGHT", -2.0, ">= 0"),
    ("CLS_LOSS", "GFL", "['QFL', 'FL']"),
    ("QUALITY", "iou-aware", "['joint', 'centerness', 'iou', 'none', 'dgqp']"),
    ("BOX_REPRESENTATION", "gaussian", "['distribution', 'dirac']"),
    ("CHECKPOINT_HEAD_MISMATCH", "ignore", "['error', 'reinit']"),
    ("QFL_BETA", 0.5, "0 or a finite number >= 1"),
    ("FOCAL_LOSS_GAMMA", 0.5, "0 or a finite number >= 1"),
    ("FOCAL_LOSS_ALPHA", 1.5, "[0, 1]"),
    ("PRIOR_PROB", 0.0, "(0, 1)"),
    ("PRIOR_PROB", 1.0, "(0, 1)"),
    ("SCORE_THRESH_TEST", 1.5, "[0, 1]"),
    ("ANCHOR_SCALE", 0.0, "> 0"),
    ("ANCHOR_OFFSET", 1.0, "[0, 1)"),
    ("CONV_DIM", 48, "multiple of 32"),
    ("IN_FEATURES", [], "IN_FEATURES"),
]


@pytest.mark.parametrize("key,value,allowed", BAD_VALUES)
def test_bad_value_names_key_and_allowed(key, value, allowed):
    cfg = tiny_cfg(**{f"MODEL.GFL.{key}": value})
    with pytest.raises(ValueError) as err:
        check_gfl_config(cfg)
    assert f"MODEL.GFL.{key}" in str(err.value)
    assert allowed in str(err.value)


def test_checked_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"MODEL\.GFL\.REG_MAX=0"):
        build_model(tiny_cfg(**{"MODEL.GFL.REG_MAX": 0}))


def test_defaults_and_shipped_configs_pass():
    names = [n for n in os.listdir(os.path.join(REPO_ROOT, "configs")) if n.endswith(".yaml")]
    assert names
    for name in sorted(names):
        check_gfl_config(tiny_cfg(name))


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_exponent_below_one_gives_nan_gradient(beta):
    """Why QFL_BETA / FOCAL_LOSS_GAMMA in (0, 1) are refused: a prediction equal to its target."""
    logits = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    quality_focal_loss(logits, torch.tensor([1.0, 0.0, 0.5]), beta).sum().backward()
    assert torch.isfinite(logits.grad).all() == (beta >= 1)


# --------------------------------------------------------------------------------------------
# NUM_CLASSES against the dataset's metadata (checked when the data loaders are built)
# --------------------------------------------------------------------------------------------
def _register(name: str, classes):
    if name not in DatasetCatalog.list():
        record = {"file_name": "unused.png", "image_id": 1, "height": 32, "width": 32,
                  "annotations": [{"bbox": [1, 1, 9, 9], "bbox_mode": 0, "category_id": 0}]}
        DatasetCatalog.register(name, lambda: [dict(record)])
        MetadataCatalog.get(name).thing_classes = list(classes)


def test_num_classes_must_match_metadata():
    _register("reliability_two_classes", ["a", "b"])
    cfg = tiny_cfg(**{"DATASETS.TRAIN": ("reliability_two_classes",)})
    trainer_cls = load_train_net().Trainer
    with pytest.raises(ValueError) as err:
        trainer_cls.build_train_loader(cfg)
    message = str(err.value)
    assert "MODEL.GFL.NUM_CLASSES=3" in message and "'reliability_two_classes'" in message
    assert "set MODEL.GFL.NUM_CLASSES 2" in message
    with pytest.raises(ValueError, match="MODEL.GFL.NUM_CLASSES=3"):
        trainer_cls.build_test_loader(cfg, "reliability_two_classes")


# --------------------------------------------------------------------------------------------
# Input size divisibility
# --------------------------------------------------------------------------------------------
@BACKBONE_REGISTRY.register()
def build_reliability_underpadded_backbone(cfg, input_shape):
    """A GFL FPN whose padding (16) is less than the stride it fuses (32): a broken custom one."""
    backbone = build_gfl_resnet_fpn_backbone(cfg, input_shape)
    backbone._size_divisibility = 16
    return backbone


def test_underpadded_backbone_is_refused_at_build_time():
    cfg = tiny_cfg(**{"MODEL.BACKBONE.NAME": "build_reliability_underpadded_backbone"})
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    assert "MODEL.BACKBONE.NAME" in str(err.value) and "multiple of 32" in str(err.value)
    # Without the check it would fail only at the first image padded to 16 and not to 32.
    backbone = build_reliability_underpadded_backbone(cfg, ShapeSpec(channels=3))
    with pytest.raises(RuntimeError):
        backbone(torch.zeros(1, 3, 48, 48))


def test_input_sizes_need_no_divisibility():
    """Any image size trains: ImageList pads each batch to the backbone's size_divisibility."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    image = torch.rand(3, 75, 101) * 255
    inputs = [{"image": image, "instances": make_instances((75, 101), [[5, 7, 60, 70]], [1])}]
    with EventStorage():
        losses = model(inputs)
    assert all(torch.isfinite(v) for v in losses.values())
