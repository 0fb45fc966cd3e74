"""The GFL head: a classification tower and a box tower shared across FPN levels."""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm

from .dgqp import DGQP
from .loss_variants import QUALITY_VARIANTS

__all__ = ["GFLHead", "Scale"]


class Scale(nn.Module):
    """A learnable scalar that multiplies one level's box logits (initialised to 1)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(in_channels: int, conv_dim: int, num_convs: int, norm: str) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(num_convs):
        channels = in_channels if i == 0 else conv_dim
        # No conv bias before a norm layer (as in the reference, whose checkpoints have none).
        layers.append(nn.Conv2d(channels, conv_dim, 3, padding=1, bias=not norm))
        if norm:
            layers.append(get_norm(norm, conv_dim))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class GFLHead(nn.Module):
    """Two towers of ``num_convs`` x (3x3 conv + norm + ReLU); on the classification tower a 3x3
    conv to ``num_classes`` logits (the joint class-IoU score under QFL); on the box tower a 3x3
    conv to ``4 * (reg_max + 1)`` distribution logits (or 4 distances for the Dirac variant),
    multiplied by a learnable per-level :class:`Scale`, and optionally a 3x3 conv to one
    quality logit (the centerness or IoU branch of the ablations) or GFLv2's :class:`DGQP`, which
    computes the quality logit from the (scaled) box distributions instead of from features.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        box_dim: int,
        with_quality_branch: bool,
        num_convs: int = 4,
        conv_dim: int = 256,
        norm: str = "GN",
        prior_prob: float = 0.01,
        dgqp: Optional[DGQP] = None,
    ):
        """
        Args:
            input_shape: shapes of the input feature maps, one per level (same channels).
            box_dim: outputs of the box conv per location: ``4 * (reg_max + 1)`` or 4.
            with_quality_branch: add the separate centerness / IoU output.
            dgqp: GFLv2's quality predictor on the box distributions (exclusive with the above).
        """
        super().__init__()
        if dgqp is not None and with_quality_branch:
            raise ValueError("GFLHead: a DGQP and a separate quality branch are exclusive")
        in_channels = {s.channels for s in input_shape}
        if len(in_channels) != 1:
            raise ValueError(f"GFLHead needs the same channels on every level, got {in_channels}")
        in_channels = in_channels.pop()
        conv_dim = conv_dim or in_channels
        self.num_levels = len(input_shape)
        self.cls_tower = _tower(in_channels, conv_dim, num_convs, norm)
        self.box_tower = _tower(in_channels, conv_dim, num_convs, norm)
        self.cls_score = nn.Conv2d(conv_dim, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(conv_dim, box_dim, 3, padding=1)
        self.quality = nn.Conv2d(conv_dim, 1, 3, padding=1) if with_quality_branch else None
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(self.num_levels)])
        self.dgqp = dgqp

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0.0)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        gfl = cfg.MODEL.GFL
        distribution = gfl.BOX_REPRESENTATION == "distribution"
        return {
            "input_shape": input_shape,
            "num_classes": gfl.NUM_CLASSES,
            "box_dim": 4 * (gfl.REG_MAX + 1) if distribution else 4,
            "with_quality_branch": QUALITY_VARIANTS[gfl.QUALITY].head_quality == "branch",
            "num_convs": gfl.NUM_CONVS,
            "conv_dim": gfl.CONV_DIM,
            "norm": gfl.NORM,
            "prior_prob": gfl.PRIOR_PROB,
            "dgqp": DGQP(gfl.REG_MAX, gfl.DGQP.TOPK, gfl.DGQP.CHANNELS, gfl.DGQP.ADD_MEAN)
            if QUALITY_VARIANTS[gfl.QUALITY].head_quality == "dgqp"
            else None,
        }

    def forward(
        self, features: List[Tensor]
    ) -> Tuple[List[Tensor], List[Tensor], Optional[List[Tensor]]]:
        """
        Returns:
            per-level lists of (N, C, Hi, Wi) class logits, (N, box_dim, Hi, Wi) box logits and,
            with a quality branch or a DGQP, (N, 1, Hi, Wi) quality logits (else None).
        """
        if len(features) != self.num_levels:
            raise ValueError(f"GFLHead built for {self.num_levels} levels, got {len(features)}")
        logits, box_logits, quality = [], [], []
        for feature, scale in zip(features, self.scales):
            cls_feature = self.cls_tower(feature)
            box_feature = self.box_tower(feature)
            logits.append(self.cls_score(cls_feature))
            box_logits.append(scale(self.box_pred(box_feature)))
            if self.quality is not None:
                quality.append(self.quality(box_feature))
            elif self.dgqp is not None:
                quality.append(self.dgqp(box_logits[-1]))
        with_quality = self.quality is not None or self.dgqp is not None
        return logits, box_logits, (quality if with_quality else None)
