"""The loss variants of GFL, one small class per ``MODEL.GFL.QUALITY`` value (paper Sec. 3 and
Tables 1-3; GFLv2), and :class:`GFLLossConfig`, the checked loss settings :class:`GFL` takes.

A variant decides three things of :meth:`GFL.losses`:

* the classification target and loss: QFL on the joint class-IoU score (Eq. 6), QFL on GFLv2's
  product ``sigmoid(cls) x sigmoid(DGQP)``, or Focal Loss on one-hot labels;
* the weight of each positive in the box losses (GIoU and DFL);
* the target of a separate quality branch trained by BCE (the ablations), if any.
"""
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ..config import CLS_LOSSES
from .losses import (
    centerness_targets,
    quality_focal_loss,
    quality_focal_loss_on_log_scores,
    sigmoid_focal_loss,
)

__all__ = [
    "CenternessQuality",
    "DGQPQuality",
    "GFLLossConfig",
    "IoUQuality",
    "JointQuality",
    "LOSS_NAMES",
    "NoQuality",
    "Positives",
    "QUALITY_VARIANTS",
    "QualityVariant",
]

# The losses GFL returns, with their default weights (MODEL.GFL.LOSS_*_WEIGHT).
LOSS_NAMES: Dict[str, float] = {"loss_cls": 1.0, "loss_box": 2.0, "loss_dfl": 0.25, "loss_quality": 1.0}
_WEIGHT_KEYS = {"loss_cls": "CLS", "loss_box": "BOX", "loss_dfl": "DFL", "loss_quality": "QUALITY"}


@dataclass
class Positives:
    """The positive anchors of a batch and their targets (``P`` of them).

    Attributes:
        img, anchor: (P,) image and anchor index of each positive; classes: (P,) its GT class.
        ious: (P,) IoU of its decoded box with its GT box, detached.
        distances: (P, 4) the (l, t, r, b) distances from its anchor center to its GT box edges,
            in units of its level's stride (the DFL targets before the clamp).
    """

    img: Tensor
    anchor: Tensor
    classes: Tensor
    ious: Tensor
    distances: Tensor

    @cached_property
    def centerness(self) -> Tensor:
        """(P,) FCOS centerness of :attr:`distances`."""
        return centerness_targets(self.distances)

    def soft_targets(self, logits: Tensor, values: Tensor) -> Tensor:
        """Float32 zeros shaped like ``logits`` (N, R, C) with ``values`` at each positive's class."""
        targets = torch.zeros_like(logits, dtype=torch.float32)
        targets[self.img, self.anchor, self.classes] = values
        return targets


class QualityVariant:
    """One value of ``MODEL.GFL.QUALITY``. Subclasses set :attr:`name`, :attr:`cls_loss` and
    :attr:`head_quality` and override what differs from Focal Loss with unit box weights.

    Attributes:
        cls_loss: the ``MODEL.GFL.CLS_LOSS`` it needs, "QFL" or "FL".
        head_quality: what the head must output as quality logits: "branch" (a conv on the box
            tower), "dgqp" (GFLv2's predictor on the distributions) or None (no quality output).
    """

    name: str = ""
    cls_loss: str = "FL"
    head_quality: Optional[str] = None

    def __init__(self, qfl_beta: float, focal_loss_alpha: float, focal_loss_gamma: float):
        self.qfl_beta = qfl_beta
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma

    def classification_loss(
        self, logits: Tensor, quality: Optional[Tensor], pos: Positives
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The classification loss summed over anchors and classes, and the detached final score
        of each positive (max over classes) where the box losses are weighted by it, else None.

        Args:
            logits: (N, R, C) class logits; quality: (N, R) quality logits or None.
        """
        targets = pos.soft_targets(logits, 1.0)
        loss = sigmoid_focal_loss(
            logits.float(),
            targets,
            alpha=self.focal_loss_alpha,
            gamma=self.focal_loss_gamma,
            reduction="sum",
        )
        return loss, None

    def box_weights(self, pos: Positives, scores: Optional[Tensor]) -> Tensor:
        """(P,) weight of each positive in GIoU and DFL; ``scores`` from :meth:`classification_loss`."""
        return torch.ones_like(pos.ious)

    def quality_target(self, pos: Positives) -> Optional[Tensor]:
        """(P,) BCE target of a separate quality branch, or None without one."""
        return None


class JointQuality(QualityVariant):
    """GFL: the class score is the IoU estimate, trained by QFL (Eq. 6) towards the IoU of the
    decoded box at the GT class; box losses weighted by the detached max class score."""

    name, cls_loss = "joint", "QFL"

    def classification_loss(self, logits, quality, pos):
        targets = pos.soft_targets(logits, pos.ious)
        loss = quality_focal_loss(logits, targets, self.qfl_beta).sum()
        return loss, logits[pos.img, pos.anchor].detach().float().sigmoid().amax(dim=1)

    def box_weights(self, pos, scores):
        return scores


class DGQPQuality(QualityVariant):
    """GFLv2: score ``sigmoid(cls) x sigmoid(DGQP)``, trained by QFL on that product through its
    log; box losses weighted by the detached max final score."""

    name, cls_loss, head_quality = "dgqp", "QFL", "dgqp"

    def classification_loss(self, logits, quality, pos):
        targets = pos.soft_targets(logits, pos.ious)
        log_scores = F.logsigmoid(logits.float()) + F.logsigmoid(quality.float())[..., None]
        loss = quality_focal_loss_on_log_scores(log_scores, targets, self.qfl_beta).sum()
        return loss, log_scores[pos.img, pos.anchor].detach().amax(dim=1).exp()

    def box_weights(self, pos, scores):
        return scores


class CenternessQuality(QualityVariant):
    """ATSS / FCOS: Focal Loss, a centerness branch (BCE to the centerness target) and box losses
    weighted by the centerness target."""

    name, head_quality = "centerness", "branch"

    def box_weights(self, pos, scores):
        return pos.centerness

    def quality_target(self, pos):
        return pos.centerness


class IoUQuality(QualityVariant):
    """Focal Loss and an IoU branch (BCE to the detached IoU of the decoded box); unit box weights."""

    name, head_quality = "iou", "branch"

    def quality_target(self, pos):
        return pos.ious


class NoQuality(QualityVariant):
    """Focal Loss only, unit box weights, no quality output."""

    name = "none"


QUALITY_VARIANTS: Dict[str, type] = {
    v.name: v for v in (JointQuality, CenternessQuality, IoUQuality, NoQuality, DGQPQuality)
}

def _finite_at_least_zero(name: str, key: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name}={value!r} ({key}) must be a finite number >= 0")


class GFLLossConfig:
    """The loss settings of :class:`GFL`, checked when built (also by a LazyConfig ``instantiate``):
    a bad value raises a ValueError naming the argument, its ``MODEL.GFL`` key and what is allowed.

    Args:
        quality: a key of :data:`QUALITY_VARIANTS` (``MODEL.GFL.QUALITY``).
        cls_loss: "QFL" or "FL" (``MODEL.GFL.CLS_LOSS``); must be the variant's: QFL trains the
            joint score ("joint", "dgqp"), Focal Loss the others.
        use_dfl: add DFL (Eq. 7) with a distribution box representation (``MODEL.GFL.USE_DFL``).
        qfl_beta: QFL's exponent, Eq. 6 (``MODEL.GFL.QFL_BETA``); focal_loss_alpha,
            focal_loss_gamma: Focal Loss's (``MODEL.GFL.FOCAL_LOSS_*``).
        weights: weights of "loss_cls", "loss_box" (GIoU), "loss_dfl", "loss_quality"; missing
            names keep :data:`LOSS_NAMES`' defaults (``MODEL.GFL.LOSS_*_WEIGHT``).

    Attributes:
        variant: the :class:`QualityVariant` of ``quality``.
    """

    def __init__(
        self,
        *,
        quality: str = "joint",
        cls_loss: str = "QFL",
        use_dfl: bool = True,
        qfl_beta: float = 2.0,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        weights: Optional[Dict[str, float]] = None,
    ):
        if quality not in QUALITY_VARIANTS:
            raise ValueError(
                f"quality={quality!r} (MODEL.GFL.QUALITY) is not one of {list(QUALITY_VARIANTS)}"
            )
        if cls_loss not in CLS_LOSSES:
            raise ValueError(f"cls_loss={cls_loss!r} (MODEL.GFL.CLS_LOSS) is not one of {list(CLS_LOSSES)}")
        variant_cls = QUALITY_VARIANTS[quality]
        if cls_loss != variant_cls.cls_loss:
            qfl = [n for n, v in QUALITY_VARIANTS.items() if v.cls_loss == "QFL"]
            raise ValueError(
                f"cls_loss={cls_loss!r} with quality={quality!r} (MODEL.GFL.CLS_LOSS, "
                "MODEL.GFL.QUALITY): the joint quality representation is trained by QFL and QFL "
                f"needs it; use cls_loss 'QFL' with quality {qfl}, or 'FL' with the others"
            )
        if not isinstance(use_dfl, bool):
            raise ValueError(f"use_dfl={use_dfl!r} (MODEL.GFL.USE_DFL) must be True or False")
        # |y - p|^e has an infinite derivative where p == y for 0 < e < 1: NaN gradients.
        for name, value in (("qfl_beta", qfl_beta), ("focal_loss_gamma", focal_loss_gamma)):
            if isinstance(value, bool) or not (value == 0 or 1 <= value < math.inf):
                raise ValueError(
                    f"{name}={value} (MODEL.GFL.{name.upper()}) must be 0 or a finite number >= 1 "
                    "(exponents in (0, 1) give NaN gradients where the prediction equals the target)"
                )
        if not (focal_loss_alpha == -1 or 0 <= focal_loss_alpha <= 1):
            raise ValueError(
                f"focal_loss_alpha={focal_loss_alpha} (MODEL.GFL.FOCAL_LOSS_ALPHA) must be in "
                "[0, 1], or -1 (no weighting)"
            )
        unknown = set(weights or {}) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"weights: unknown losses {sorted(unknown)}; GFL's are {list(LOSS_NAMES)}")
        self.weights = dict(LOSS_NAMES, **(weights or {}))
        for name, value in self.weights.items():
            _finite_at_least_zero(f"weights[{name!r}]", f"MODEL.GFL.LOSS_{_WEIGHT_KEYS[name]}_WEIGHT", value)
        self.quality = quality
        self.cls_loss = cls_loss
        self.use_dfl = use_dfl
        self.variant = variant_cls(qfl_beta, focal_loss_alpha, focal_loss_gamma)

    def __repr__(self) -> str:
        v = self.variant
        return (
            f"GFLLossConfig(quality={self.quality!r}, cls_loss={self.cls_loss!r}, "
            f"use_dfl={self.use_dfl}, qfl_beta={v.qfl_beta}, focal_loss_alpha={v.focal_loss_alpha}, "
            f"focal_loss_gamma={v.focal_loss_gamma}, weights={self.weights})"
        )
