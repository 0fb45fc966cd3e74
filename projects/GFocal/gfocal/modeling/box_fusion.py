"""Weighted box fusion (Solovyev et al., "Weighted boxes fusion: ensembling boxes from different
object detection models", Image and Vision Computing 2021), for merging test-time augmentations.

Written here rather than taken from ``ensemble-boxes`` (PyPI): that package imports numba and
pandas at import time (its ``__init__`` loads its numba NMS), works on numpy arrays of boxes
normalised to [0, 1] and on the CPU only. This version takes the detections of all versions as
one set of torch tensors in pixels on any device and follows the library's ``conf_type="avg"``
rule: boxes sorted by score; each joins the fused box of its class with the highest IoU if that
IoU is > ``iou_thresh``, else starts a new one; a fused box is the score-weighted mean of its
members, its score their mean score times ``min(members, num_versions) / num_versions``.
"""
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["weighted_box_fusion"]


def _clusters(b: np.ndarray, s: np.ndarray, c: np.ndarray, iou_thresh: float):
    """The clusters of boxes ``b`` (N, 4) sorted by score ``s``, classes ``c``: per cluster its
    score-weighted mean box, score sum, member count and class."""
    n = len(b)
    fused_sum = np.zeros((n, 4))  # sum of score x box of each cluster
    fused_weight = np.zeros(n)  # sum of scores
    fused_count = np.zeros(n)
    fused_class = np.full(n, -1, dtype=c.dtype)
    current = np.zeros((n, 4))  # fused_sum / fused_weight
    area = np.zeros(n)
    num_fused = 0
    for i in range(n):
        j = -1
        box = b[i]
        if num_fused:
            cur = current[:num_fused]
            wh = np.minimum(box[2:], cur[:, 2:]) - np.maximum(box[:2], cur[:, :2])
            inter = np.clip(wh, 0, None).prod(axis=1)
            box_area = (box[2] - box[0]) * (box[3] - box[1])
            ious = np.where(inter > 0, inter / (box_area + area[:num_fused] - inter), 0.0)
            ious[fused_class[:num_fused] != c[i]] = -1.0
            best = int(np.argmax(ious))
            if ious[best] > iou_thresh:
                j = best
        if j < 0:
            j = num_fused
            num_fused += 1
            fused_class[j] = c[i]
        fused_sum[j] += s[i] * box
        fused_weight[j] += s[i]
        fused_count[j] += 1
        current[j] = fused_sum[j] / fused_weight[j]
        area[j] = (current[j, 2] - current[j, 0]) * (current[j, 3] - current[j, 1])
    k = num_fused
    return current[:k].copy(), fused_weight[:k], fused_count[:k], fused_class[:k].copy()


def weighted_box_fusion(
    boxes: Tensor, scores: Tensor, classes: Tensor, num_versions: int, iou_thresh: float = 0.55
) -> Tuple[Tensor, Tensor, Tensor]:
    """Fuse the detections ``boxes`` (N, 4) XYXY, ``scores`` (N,), ``classes`` (N,) of
    ``num_versions`` predictions (models or augmentations) of one image.

    Returns the fused boxes, scores and classes, sorted by score (highest first).
    """
    if num_versions < 1:
        raise ValueError(f"num_versions={num_versions} must be >= 1")
    if boxes.numel() == 0:
        return boxes.reshape(0, 4), scores[:0], classes[:0]
    dtype, device = boxes.dtype, boxes.device
    order = torch.argsort(scores, descending=True, stable=True)
    # Sums in float64: the mean of identical boxes is that box, not one float32 ulp off it. The
    # sequence of joins depends on earlier ones (a fused box moves as members join), so the loop
    # over boxes stays; it runs in numpy (a small torch op costs ~10x a numpy one), keeps each
    # fused box's mean up to date instead of recomputing all, and computes the IoU with all fused
    # boxes of a step in one vectorised expression (detectron2's pairwise_iou's arithmetic).
    b = boxes[order].detach().cpu().double().numpy()
    s = scores[order].detach().cpu().double().numpy()
    c = classes[order].detach().cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):  # zero scores: nan boxes, as torch's
        current, weight, count, fused_class = _clusters(b, s, c, iou_thresh)
    out_boxes = torch.from_numpy(current)
    out_scores = torch.from_numpy(weight / count * np.minimum(count, num_versions) / num_versions)
    out_classes = torch.from_numpy(fused_class)
    order = torch.argsort(out_scores, descending=True, stable=True)
    return (out_boxes[order].to(device=device, dtype=dtype), out_scores[order].float().to(device),
            out_classes[order].to(classes.device))
