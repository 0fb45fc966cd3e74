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

import torch
from torch import Tensor

from detectron2.structures import pairwise_iou, Boxes

__all__ = ["weighted_box_fusion"]


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
    dtype = boxes.dtype
    order = torch.argsort(scores, descending=True, stable=True)
    # Sums in float64: the mean of identical boxes is that box, not one float32 ulp off it.
    boxes, scores, classes = boxes[order].double(), scores[order].double(), classes[order]
    # The sequence of joins depends on earlier ones (a fused box moves as members join), so the
    # loop over boxes stays; the IoU with all fused boxes of a step is one vectorised call.
    fused_sum = boxes.new_zeros((len(boxes), 4))  # sum of score x box of each cluster
    fused_weight = boxes.new_zeros(len(boxes))  # sum of scores
    fused_count = boxes.new_zeros(len(boxes))
    fused_class = classes.new_full((len(boxes),), -1)
    num_fused = 0
    for i in range(len(boxes)):
        j = -1
        if num_fused:
            current = fused_sum[:num_fused] / fused_weight[:num_fused, None]
            ious = pairwise_iou(Boxes(boxes[i : i + 1]), Boxes(current))[0]
            ious[fused_class[:num_fused] != classes[i]] = -1.0
            best = int(torch.argmax(ious))
            if ious[best] > iou_thresh:
                j = best
        if j < 0:
            j = num_fused
            num_fused += 1
            fused_class[j] = classes[i]
        fused_sum[j] += scores[i] * boxes[i]
        fused_weight[j] += scores[i]
        fused_count[j] += 1
    count = fused_count[:num_fused]
    out_boxes = fused_sum[:num_fused] / fused_weight[:num_fused, None]
    out_scores = fused_weight[:num_fused] / count * count.clamp(max=num_versions) / num_versions
    order = torch.argsort(out_scores, descending=True, stable=True)
    return out_boxes[order].to(dtype), out_scores[order].float(), fused_class[:num_fused][order]
