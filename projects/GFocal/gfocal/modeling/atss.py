"""Adaptive Training Sample Selection (ATSS, Zhang et al., CVPR 2020), batched over images."""
from typing import List, Tuple

import torch
from torch import Tensor

__all__ = ["atss_assign", "center_distances", "nearest_candidates", "pad_gt_boxes"]


@torch.no_grad()
def atss_assign(
    anchors: Tensor,
    num_anchors_per_level: List[int],
    gt_boxes: Tensor,
    gt_valid: Tensor,
    topk: int = 9,
) -> Tensor:
    """Assign every anchor to at most one GT box, for a whole batch at once.

    For each GT: per level, the ``topk`` anchors whose centers are nearest to the GT center are
    candidates (all anchors of a level with fewer than ``topk``); the IoU threshold is the mean plus
    the (unbiased) standard deviation of the candidates' IoUs; positives are candidates with IoU at
    or above it whose center lies inside the GT (all four distances > 0.01). An anchor claimed by
    several GTs goes to the one with the highest IoU.

    Args:
        anchors: (R, 4) XYXY anchor boxes of all levels, concatenated level by level.
        num_anchors_per_level: the number of anchors of each level, summing to R.
        gt_boxes: (N, G, 4) GT boxes of N images, padded to G per image.
        gt_valid: (N, G) bool, False for the padding.
        topk: candidates per level and GT.

    Returns:
        (N, R) int64: the index of the matched GT in ``gt_boxes[i]``, or -1 for negatives.
    """
    num_images, num_gts = gt_valid.shape
    num_anchors = anchors.shape[0]
    if num_gts == 0:
        return torch.full((num_images, num_anchors), -1, dtype=torch.long, device=anchors.device)

    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # (R, 2)
    gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (N, G, 2)

    candidates = nearest_candidates(anchor_centers, num_anchors_per_level, gt_centers, topk)

    # IoUs of the candidates only (not of every anchor with every GT of every image).
    candidate_ious = _aligned_iou(anchors[candidates], gt_boxes[:, None, :, :])  # (N, K, G)
    threshold = candidate_ious.mean(dim=1) + candidate_ious.std(dim=1)  # (N, G)
    is_pos = candidate_ious >= threshold[:, None, :]

    # Center of the candidate strictly inside the GT.
    cand_centers = anchor_centers[candidates]  # (N, K, G, 2)
    gt = gt_boxes[:, None, :, :]  # (N, 1, G, 4)
    inside = torch.stack(
        [
            cand_centers[..., 0] - gt[..., 0],
            cand_centers[..., 1] - gt[..., 1],
            gt[..., 2] - cand_centers[..., 0],
            gt[..., 3] - cand_centers[..., 1],
        ],
        dim=-1,
    ).amin(dim=-1) > 0.01
    is_pos &= inside & gt_valid[:, None, :]

    # An anchor claimed by several GTs goes to the highest IoU (the lowest GT index among equals):
    # per anchor, the max positive IoU, then the lowest GT index reaching it, by scatter-reduce.
    flat_anchor = candidates.flatten(1)  # (N, K * G)
    flat_iou = torch.where(is_pos, candidate_ious, -1.0).flatten(1)
    best_iou = flat_iou.new_full((num_images, num_anchors), -1.0)
    best_iou = best_iou.scatter_reduce(1, flat_anchor, flat_iou, reduce="amax")
    gt_index = torch.arange(num_gts, device=anchors.device).expand_as(candidates).flatten(1)
    wins = (flat_iou >= 0) & (flat_iou == best_iou.gather(1, flat_anchor))
    matched = torch.full_like(flat_anchor[:, :1], num_gts).expand(-1, num_anchors).clone()
    matched = matched.scatter_reduce(1, flat_anchor, torch.where(wins, gt_index, num_gts), reduce="amin")
    return torch.where(matched < num_gts, matched, torch.full_like(matched, -1))


def nearest_candidates(
    anchor_centers: Tensor, num_anchors_per_level: List[int], gt_centers: Tensor, topk: int
) -> Tensor:
    """Per level, the ``topk`` anchors whose centers (R, 2) are nearest to each GT center
    (N, G, 2) (all of a level's anchors if it has fewer): (N, K, G) anchor indices, K the sum of
    the per-level counts."""
    candidates = []
    start = 0
    for level_size in num_anchors_per_level:
        distances = center_distances(anchor_centers[start : start + level_size], gt_centers)
        _, idx = distances.topk(min(topk, level_size), dim=1, largest=False)
        candidates.append(idx + start)
        start += level_size
    return torch.cat(candidates, dim=1)


def center_distances(points: Tensor, centers: Tensor) -> Tensor:
    """Euclidean distances (N, P, G) of points (P, 2) to the centers (N, G, 2), computed from the
    coordinate differences. ``torch.cdist`` switches to a matrix-product formula for large inputs
    whose rounding (up to ~2e-3 px at image scale) can swap two near-tied candidates."""
    return (points[None, :, None, :] - centers[:, None, :, :]).pow(2).sum(dim=-1).sqrt()


def _aligned_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of XYXY boxes broadcast against each other, with the same arithmetic as detectron2's
    ``pairwise_iou`` (so the same values, bit for bit)."""
    width_height = torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])
    inter = width_height.clamp(min=0).prod(dim=-1)
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    return torch.where(inter > 0, inter / (area1 + area2 - inter), torch.zeros_like(inter))


def pad_gt_boxes(boxes_per_image: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Stack per-image (Gi, 4) boxes into (N, G, 4) with G = max Gi, and a (N, G) validity mask."""
    num_images = len(boxes_per_image)
    max_gts = max((len(b) for b in boxes_per_image), default=0)
    device = boxes_per_image[0].device
    padded = boxes_per_image[0].new_zeros((num_images, max_gts, 4))
    valid = torch.zeros((num_images, max_gts), dtype=torch.bool, device=device)
    for i, boxes in enumerate(boxes_per_image):
        padded[i, : len(boxes)] = boxes
        valid[i, : len(boxes)] = True
    return padded, valid
