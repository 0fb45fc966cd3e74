"""Losses of GFL and of the ATSS baseline. All return per-element losses (no reduction) in float32;
:class:`~gfocal.modeling.gfl.GFL` sums and normalises them."""
import torch
import torch.distributed as dist
from fvcore.nn import sigmoid_focal_loss
from torch import Tensor
from torch.nn import functional as F

from detectron2.utils import comm

__all__ = [
    "quality_focal_loss",
    "quality_focal_loss_on_scores",
    "quality_focal_loss_on_log_scores",
    "distribution_focal_loss",
    "sigmoid_focal_loss",
    "aligned_iou",
    "giou_loss",
    "centerness_targets",
    "all_reduce_mean",
    "DFL_TARGET_MARGIN",
]

# DFL targets are clamped to [0, reg_max - DFL_TARGET_MARGIN], so that the right bin floor(y) + 1
# of every target exists (Eq. 7).
DFL_TARGET_MARGIN = 0.1


def quality_focal_loss(logits: Tensor, targets: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss, paper Eq. (6)/(10):
    ``QFL(s) = -|y - s|^beta * ((1 - y) log(1 - s) + y log(s))`` with ``s = sigmoid(logits)``.

    Args:
        logits: (..., C) classification logits.
        targets: same shape, the soft joint targets ``y`` in [0, 1]: the IoU of the predicted box
            with its GT at the GT's class of a positive, 0 elsewhere.
    """
    logits = logits.float()
    targets = targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    modulating = (targets - logits.sigmoid()).abs().pow(beta)
    return bce * modulating


# Smallest log of a probability, as torch's binary_cross_entropy clamps it (keeps the loss finite
# where a score is exactly 0 or 1).
_LOG_MIN = -100.0


def _clamped_log(x: Tensor) -> Tensor:
    """``max(log(x), -100)`` for x in [0, 1] with a finite gradient (0 where x == 0)."""
    tiny = torch.finfo(x.dtype).tiny
    return torch.where(x > 0, x.clamp(min=tiny).log(), x.new_tensor(_LOG_MIN)).clamp(min=_LOG_MIN)


def quality_focal_loss_on_log_scores(log_scores: Tensor, targets: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss on a score given by its log, ``s = exp(log_scores)`` (GFLv2, where the
    score is the product ``sigmoid(cls) x quality`` and no logit of it exists), paper Eq. (6):
    ``-|y - s|^beta * ((1 - y) log(1 - s) + y log(s))``.

    Runs in float32 whatever the input dtype, so it is safe under autocast (unlike
    ``binary_cross_entropy``, which autocast refuses); ``log(1 - s)`` is taken as
    ``log(-expm1(log s))``, exact for small scores, and both logs are clamped at -100 as
    ``binary_cross_entropy`` does: finite losses and gradients for scores of exactly 0 and 1.

    Args:
        log_scores: (..., C) log of scores in [0, 1], e.g. ``logsigmoid(cls) + logsigmoid(quality)``.
        targets: same shape, the soft targets ``y`` in [0, 1].
    """
    log_s = log_scores.float().clamp(max=0.0)
    targets = targets.float()
    log_1ms = _clamped_log(-torch.expm1(log_s))
    bce = -(targets * log_s.clamp(min=_LOG_MIN) + (1.0 - targets) * log_1ms)
    modulating = (targets - log_s.exp()).abs().pow(beta)
    return bce * modulating


def quality_focal_loss_on_scores(scores: Tensor, targets: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss on probabilities ``s`` in [0, 1] (paper Eq. 6 with ``s`` given directly,
    mmdetection's ``use_sigmoid=False``); equals ``binary_cross_entropy(s, y) * |y - s|^beta``,
    also at 0 and 1. See :func:`quality_focal_loss_on_log_scores`."""
    return quality_focal_loss_on_log_scores(_clamped_log(scores.float()), targets, beta)


def distribution_focal_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Distribution Focal Loss, paper Eq. (7)/(11):
    ``DFL(S) = -((y_{i+1} - y) log S_i + (y - y_i) log S_{i+1})`` with ``S = softmax(logits)``
    and ``y_i <= y <= y_{i+1}`` the two bins around the target.

    Args:
        logits: (M, reg_max + 1) logits of M edge distributions.
        targets: (M,) target distances in bins, in [0, reg_max]. A target equal to ``reg_max``
            puts all its weight on the last bin.
    Returns:
        (M,) losses.
    """
    logits = logits.float()
    targets = targets.float()
    reg_max = logits.shape[-1] - 1
    left = targets.floor().long().clamp(min=0, max=reg_max - 1)
    right = left + 1
    weight_left = right.float() - targets
    weight_right = targets - left.float()
    log_prob = F.log_softmax(logits, dim=-1)
    return -(
        log_prob.gather(-1, left[:, None]).squeeze(-1) * weight_left
        + log_prob.gather(-1, right[:, None]).squeeze(-1) * weight_right
    )


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of each box in ``boxes1`` (..., 4) with the box at the same index in ``boxes2``."""
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(dim=-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(dim=-1)
    return inter / (area1 + area2 - inter).clamp(min=eps)


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """``1 - GIoU`` of aligned XYXY boxes (Rezatofighi et al. 2019), per box."""
    pred = pred.float()
    target = target.float()
    lt = torch.max(pred[..., :2], target[..., :2])
    rb = torch.min(pred[..., 2:], target[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_pred = (pred[..., 2:] - pred[..., :2]).clamp(min=0).prod(dim=-1)
    area_target = (target[..., 2:] - target[..., :2]).clamp(min=0).prod(dim=-1)
    union = (area_pred + area_target - inter).clamp(min=eps)
    enclose_lt = torch.min(pred[..., :2], target[..., :2])
    enclose_rb = torch.max(pred[..., 2:], target[..., 2:])
    enclose = (enclose_rb - enclose_lt).clamp(min=0).prod(dim=-1).clamp(min=eps)
    giou = inter / union - (enclose - union) / enclose
    return 1.0 - giou


def centerness_targets(distances: Tensor) -> Tensor:
    """FCOS centerness of (l, t, r, b) distances (..., 4):
    ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``."""
    left_right = distances[..., [0, 2]]
    top_bottom = distances[..., [1, 3]]
    ratio = (left_right.min(dim=-1).values / left_right.max(dim=-1).values.clamp(min=1e-6)) * (
        top_bottom.min(dim=-1).values / top_bottom.max(dim=-1).values.clamp(min=1e-6)
    )
    return ratio.clamp(min=0).sqrt()


def all_reduce_mean(value: Tensor) -> Tensor:
    """Average a scalar tensor over all workers, so that N workers normalise their losses like one
    process holding the whole batch (positive counts, sums of box weights)."""
    if comm.get_world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / comm.get_world_size()
