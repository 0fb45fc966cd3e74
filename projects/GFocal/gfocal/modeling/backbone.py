"""ResNet/ResNeXt + FPN with P6/P7 built as in the GFL reference (from the FPN output P5)."""
import math
from typing import List

from torch import Tensor, nn
from torch.nn import functional as F

import fvcore.nn.weight_init as weight_init
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, build_resnet_backbone

from ..utils import deform_conv_build_error

__all__ = ["LastLevelP6P7", "build_gfl_resnet_fpn_backbone"]


class LastLevelP6P7(nn.Module):
    """P6 = 3x3/2 conv of ``in_feature``; P7 = 3x3/2 conv of P6 (after a ReLU if ``relu``).

    The GFL reference uses ``in_feature="p5"`` (the FPN output) and no ReLU; detectron2's
    RetinaNet uses ``"res5"`` and a ReLU. ``num_levels=1`` builds P6 only.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        in_feature: str = "p5",
        relu: bool = False,
        num_levels: int = 2,
    ):
        super().__init__()
        if num_levels not in (1, 2):
            raise ValueError(f"LastLevelP6P7: num_levels={num_levels} must be 1 (P6) or 2 (P6, P7)")
        self.num_levels = num_levels
        self.in_feature = in_feature
        self.relu = relu
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        weight_init.c2_xavier_fill(self.p6)
        if num_levels == 2:
            self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
            weight_init.c2_xavier_fill(self.p7)

    def forward(self, x: Tensor) -> List[Tensor]:
        p6 = self.p6(x)
        if self.num_levels == 1:
            return [p6]
        return [p6, self.p7(F.relu(p6) if self.relu else p6)]


@BACKBONE_REGISTRY.register()
def build_gfl_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """ResNet (``MODEL.RESNETS``) + FPN (``MODEL.FPN``) + :class:`LastLevelP6P7` with
    ``MODEL.FPN.TOP_BLOCK_IN_FEATURE`` and ``MODEL.FPN.TOP_BLOCK_RELU``."""
    deform_stages = list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)
    if any(deform_stages):
        error = deform_conv_build_error(cfg.MODEL.RESNETS.DEFORM_MODULATED)
        if error:
            raise RuntimeError(
                f"MODEL.RESNETS.DEFORM_ON_PER_STAGE={deform_stages} needs deformable convolution, "
                f"but {error}: build detectron2 with its C++/CUDA ops, or use a config without DCN"
            )
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return fpn_with_p6p7(cfg, bottom_up)


def fpn_with_p6p7(cfg, bottom_up) -> FPN:
    """An FPN over any detectron2 ``bottom_up`` backbone, with the configured P6/P7 top block
    (only its levels that ``MODEL.GFL.IN_FEATURES`` reads)."""
    in_feature = cfg.MODEL.FPN.TOP_BLOCK_IN_FEATURE
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if in_feature.startswith("p"):
        in_channels = out_channels
    else:
        shapes = bottom_up.output_shape()
        if in_feature not in shapes:
            raise ValueError(
                f"MODEL.FPN.TOP_BLOCK_IN_FEATURE={in_feature!r}: the backbone has "
                f"{sorted(shapes)}; use a FPN output such as 'p5' or one of those."
            )
        in_channels = shapes[in_feature].channels
    num_levels = _top_levels_used(cfg, bottom_up)
    top_block = None
    if num_levels:
        top_block = LastLevelP6P7(
            in_channels, out_channels, in_feature, cfg.MODEL.FPN.TOP_BLOCK_RELU, num_levels
        )
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    size_divisibility = cfg.MODEL.FPN.SIZE_DIVISIBILITY
    if size_divisibility < 0:
        raise ValueError(f"MODEL.FPN.SIZE_DIVISIBILITY={size_divisibility} must be >= 0")
    if size_divisibility:
        # The attribute behind FPN.size_divisibility (and padding_constraints upstream).
        fpn._size_divisibility = size_divisibility
    return fpn


def _top_levels_used(cfg, bottom_up) -> int:
    """How many of the top block's levels (P6, P7 above an FPN ending at P5) the head reads
    (``MODEL.GFL.IN_FEATURES``): unread levels are not built, so that no parameter is left without
    a gradient (DistributedDataParallel stops on those). The COCO configs read both."""
    in_features = cfg.MODEL.FPN.IN_FEATURES
    shape = bottom_up.output_shape().get(in_features[-1]) if in_features else None
    if shape is None:
        return 2  # FPN itself reports the bad MODEL.FPN.IN_FEATURES
    last = int(math.log2(shape.stride))
    used = [i + 1 for i in range(2) if f"p{last + 1 + i}" in cfg.MODEL.GFL.IN_FEATURES]
    return max(used, default=0)
