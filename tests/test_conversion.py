"""gfocal.model_io.conversion: mmdetection GFL state dicts (names and shapes as mmdet v1/v2/v3 write them,
generated here from the architecture, independently of our model) -> detectron2 GFL models."""
import math
import os
import sys

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY

import gfocal
from gfocal.utils import deform_conv_build_error
from gfocal.model_io.conversion import (
    ConversionError,
    check_against_model,
    convert_mmdet_gfl_checkpoint,
    convert_mmdet_gfl_state_dict,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def mmdet_gfl_state_dict(
    depth: int = 50,
    groups: int = 1,
    base_width: int = 4,
    fpn_channels: int = 256,
    num_classes: int = 80,
    reg_max: int = 16,
    stacked_convs: int = 4,
    dcn_stages=(),
    modulated: bool = False,
    v1: bool = False,
    make=torch.empty,
):
    """The keys and shapes of an mmdetection GFL (ResNet/ResNeXt + FPN start_level 1 with P6/P7
    convs + GFLHead) checkpoint. ``v1``: the official GFocal repository's layout (DCN offsets in
    ``convN_offset``, the integral as ``distribution_project``, no BN counters). ``dcn_stages``:
    mmdet layer indices (1-4) with deformable 3x3 convs."""
    sd = {}

    def conv(name, out_c, in_c, k, bias=False):
        sd[f"{name}.weight"] = make(out_c, in_c, k, k)
        if bias:
            sd[f"{name}.bias"] = make(out_c)

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{name}.{p}"] = make(c)
        if not v1:
            sd[f"{name}.num_batches_tracked"] = torch.tensor(0)

    basic = depth < 50
    conv("backbone.conv1", 64, 3, 7)
    bn("backbone.bn1", 64)
    in_c, outs = 64, []
    for i, n in enumerate(BLOCKS[depth]):
        planes = 64 * 2**i
        width = planes if groups == 1 else math.floor(planes * base_width / 64) * groups
        out_c = planes if basic else planes * 4
        for j in range(n):
            p = f"backbone.layer{i + 1}.{j}"
            c = in_c if j == 0 else out_c
            if basic:
                conv(f"{p}.conv1", planes, c, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            else:
                conv(f"{p}.conv1", width, c, 1), bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width // groups, 3), bn(f"{p}.bn2", width)
                conv(f"{p}.conv3", out_c, width, 1), bn(f"{p}.bn3", out_c)
                if i + 1 in dcn_stages:
                    offset = f"{p}.conv2_offset" if v1 else f"{p}.conv2.conv_offset"
                    conv(offset, 27 if modulated else 18, width, 3, bias=True)
            if j == 0 and c != out_c:
                conv(f"{p}.downsample.0", out_c, c, 1), bn(f"{p}.downsample.1", out_c)
        in_c = out_c
        outs.append(out_c)
    for k, c in enumerate(outs[1:]):
        conv(f"neck.lateral_convs.{k}.conv", fpn_channels, c, 1, bias=True)
    for k in range(5):
        conv(f"neck.fpn_convs.{k}.conv", fpn_channels, fpn_channels, 3, bias=True)
    for tower in ("cls_convs", "reg_convs"):
        for k in range(stacked_convs):
            conv(f"bbox_head.{tower}.{k}.conv", fpn_channels, fpn_channels, 3)
            sd[f"bbox_head.{tower}.{k}.gn.weight"] = make(fpn_channels)
            sd[f"bbox_head.{tower}.{k}.gn.bias"] = make(fpn_channels)
    conv("bbox_head.gfl_cls", num_classes, fpn_channels, 3, bias=True)
    conv("bbox_head.gfl_reg", 4 * (reg_max + 1), fpn_channels, 3, bias=True)
    for k in range(5):
        sd[f"bbox_head.scales.{k}.scale"] = make(())
    project = "distribution_project" if v1 else "integral"
    sd[f"bbox_head.{project}.project"] = torch.linspace(0, reg_max, reg_max + 1)
    return sd


def _cfg(config="configs/mmdet/gfl_R_50_FPN_1x.yaml", opts=()):
    cfg = get_cfg()
    gfocal.add_gfl_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _meta_model(cfg):
    with torch.device("meta"):
        return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)


ARCHS = {
    "R-50": ("configs/mmdet/gfl_R_50_FPN_1x.yaml", dict(depth=50)),
    "R-101": ("configs/mmdet/gfl_R_101_FPN_ms2x.yaml", dict(depth=101)),
    "X-101-32x4d": ("configs/mmdet/gfl_X_101_32x4d_FPN_ms2x.yaml", dict(depth=101, groups=32)),
    "R-101-dconv-c3-c5": (
        "configs/mmdet/gfl_R_101_dconv_c3-c5_FPN_ms2x.yaml",
        dict(depth=101, dcn_stages=(2, 3, 4)),
    ),
    "X-101-32x4d-dconv-c4-c5": (
        "configs/mmdet/gfl_X_101_32x4d_dconv_c4-c5_FPN_ms2x.yaml",
        dict(depth=101, groups=32, dcn_stages=(3, 4)),
    ),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("v1", [False, True], ids=["mmdet-v2v3", "mmdet-v1"])
def test_every_key_mapped_and_loads(arch, v1):
    config, kwargs = ARCHS[arch]
    if kwargs.get("dcn_stages"):
        reason = deform_conv_build_error(_cfg(config).MODEL.RESNETS.DEFORM_MODULATED)
        if reason:
            pytest.skip(reason)
    source = mmdet_gfl_state_dict(v1=v1, **kwargs)
    converted, info = convert_mmdet_gfl_state_dict(source, num_classes=80, reg_max=16)
    assert (info.num_classes, info.reg_max, info.num_convs, info.num_levels) == (80, 16, 4, 5)
    dropped = [k for k in source if k.endswith("num_batches_tracked") or k.endswith(".project")]
    assert sorted(info.dropped) == sorted(dropped)
    assert len(converted) + len(info.dropped) == len(source)  # each source key used once
    model = _meta_model(_cfg(config))
    check_against_model(converted, model.state_dict())
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_values_land_in_the_right_tensors():
    torch.manual_seed(0)
    source = mmdet_gfl_state_dict(depth=50, make=torch.randn)
    converted, _ = convert_mmdet_gfl_state_dict(source)
    model = META_ARCH_REGISTRY.get("GFL")(_cfg())
    model.load_state_dict(converted, strict=True)
    pairs = {
        "backbone.conv1.weight": model.backbone.bottom_up.stem.conv1.weight,
        "backbone.layer3.5.bn3.running_var": model.backbone.bottom_up.res4[5].conv3.norm.running_var,
        "backbone.layer2.0.downsample.0.weight": model.backbone.bottom_up.res3[0].shortcut.weight,
        "neck.lateral_convs.0.conv.weight": model.backbone.fpn_lateral3.weight,
        "neck.fpn_convs.2.conv.bias": model.backbone.fpn_output5.bias,
        "neck.fpn_convs.3.conv.weight": model.backbone.top_block.p6.weight,
        "neck.fpn_convs.4.conv.weight": model.backbone.top_block.p7.weight,
        "bbox_head.cls_convs.2.conv.weight": model.head.cls_tower[6].weight,
        "bbox_head.reg_convs.3.gn.bias": model.head.box_tower[10].bias,
        "bbox_head.gfl_cls.bias": model.head.cls_score.bias,
        "bbox_head.gfl_reg.weight": model.head.box_pred.weight,
        "bbox_head.scales.4.scale": model.head.scales[4].scale,
    }
    for key, tensor in pairs.items():
        assert torch.equal(source[key], tensor.detach()), key


def test_refuses_a_checkpoint_that_is_not_gfl():
    source = mmdet_gfl_state_dict(depth=18, fpn_channels=64, stacked_convs=1)
    source = {k.replace("gfl_", "atss_"): v for k, v in source.items()}
    with pytest.raises(ConversionError, match="not a GFL checkpoint.*bbox_head.atss_cls"):
        convert_mmdet_gfl_state_dict(source)


def test_refuses_other_class_count_or_reg_max():
    source = mmdet_gfl_state_dict(depth=18, fpn_channels=64, stacked_convs=1, num_classes=20)
    with pytest.raises(ConversionError, match="20 classes.*NUM_CLASSES=80"):
        convert_mmdet_gfl_state_dict(source, num_classes=80, reg_max=16)
    source = mmdet_gfl_state_dict(depth=18, fpn_channels=64, stacked_convs=1, reg_max=7)
    with pytest.raises(ConversionError, match="reg_max=7.*REG_MAX=16"):
        convert_mmdet_gfl_state_dict(source, num_classes=80, reg_max=16)


def test_unknown_and_missing_keys_are_listed():
    source = mmdet_gfl_state_dict(depth=50)
    source["bbox_head.extra.weight"] = torch.empty(1)
    with pytest.raises(ConversionError, match=r"no detectron2 GFL counterpart: \['bbox_head.extra.weight'\]"):
        convert_mmdet_gfl_state_dict(source)
    del source["bbox_head.extra.weight"]
    del source["bbox_head.scales.4.scale"]
    converted, _ = convert_mmdet_gfl_state_dict(source)
    with pytest.raises(ConversionError, match=r"not filled.*head.scales.4.scale"):
        check_against_model(converted, _meta_model(_cfg()).state_dict())


def test_wrong_architecture_names_the_shape_mismatch():
    converted, _ = convert_mmdet_gfl_state_dict(mmdet_gfl_state_dict(depth=101, groups=32))
    model = _meta_model(_cfg("configs/mmdet/gfl_R_101_FPN_ms2x.yaml"))
    with pytest.raises(ConversionError, match=r"shape mismatches.*res2.0.conv1.weight"):
        check_against_model(converted, model.state_dict())


def test_project_buffer_is_checked():
    source = mmdet_gfl_state_dict(depth=18, fpn_channels=64, stacked_convs=1)
    source["bbox_head.integral.project"] = torch.linspace(0, 1, 17)
    with pytest.raises(ConversionError, match="integral projection"):
        convert_mmdet_gfl_state_dict(source)


def test_command_converts_a_file_and_detectron2_loads_it(tmp_path, capsys):
    """The tool end to end on a small R-18 model (mmdet v2 file layout: {"state_dict", "meta"})."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import convert_mmdet_gfl
    finally:
        sys.path.pop(0)
    opts = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
            "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.GFL.NUM_CONVS", "1"]
    source = mmdet_gfl_state_dict(depth=18, fpn_channels=64, stacked_convs=1, make=torch.randn)
    src, dst = tmp_path / "mmdet.pth", tmp_path / "out" / "d2.pth"
    torch.save({"state_dict": source, "meta": {"mmdet_version": "3.3.0"}}, src)
    args = ["--config-file", os.path.join(REPO, "configs/mmdet/gfl_R_50_FPN_1x.yaml"),
            "--input", str(src), "--output", str(dst), *opts]
    assert convert_mmdet_gfl.main(args) == 0
    assert "80 classes, reg_max 16" in capsys.readouterr().out

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(_cfg(opts=opts))
    DetectionCheckpointer(model).load(str(dst))
    assert torch.equal(model.head.cls_score.bias.detach(), source["bbox_head.gfl_cls.bias"])
    assert torch.equal(
        model.backbone.bottom_up.res5[1].conv2.norm.running_mean,
        source["backbone.layer4.1.bn2.running_mean"],
    )

    # The same command refuses a config whose class count differs, naming the key.
    assert convert_mmdet_gfl.main(args + ["MODEL.GFL.NUM_CLASSES", "20"]) == 1
    assert "MODEL.GFL.NUM_CLASSES=20" in capsys.readouterr().err


def test_convert_function_refuses_pickled_objects_unless_allowed(tmp_path):
    import argparse

    source = mmdet_gfl_state_dict(depth=18, fpn_channels=64, stacked_convs=1)
    src = tmp_path / "pickled.pth"
    torch.save({"state_dict": source, "meta": {"args": argparse.Namespace(lr=0.01)}}, src)
    cfg = _cfg(opts=["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                     "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.GFL.NUM_CONVS", "1"])
    with pytest.raises(ConversionError, match="--allow-pickle"):
        convert_mmdet_gfl_checkpoint(str(src), str(tmp_path / "out.pth"), cfg)
