"""Merging the detections of overlapping tiles into one set per whole image.

Seam rule (documented in docs/whole_images.md): a box that touches an *inner* edge of its tile
(an edge that is not the image border; within ``edge_margin`` pixels) was probably cut by that
edge. It is dropped when another tile of the grid holds the same box whole, i.e. clear of that
tile's own inner edges: that tile saw the object uncut and predicts it itself. Boxes cut where no
tile sees them whole (objects larger than the overlap) are kept. Then class-wise NMS at the
model's threshold (torchvision's ``batched_nms``) removes the duplicates of the overlap zones and
the best ``max_dets`` are kept. Without the rule (``edge_margin < 0``) only NMS decides, as in
SAHI with ``postprocess_type="NMS"``: a truncated box can then survive beside (IoU below the NMS
threshold) or win over (higher score) the whole box of the neighbour.
"""
from typing import Tuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

__all__ = ["cut_by_inner_edge", "covered_whole_elsewhere", "merge_detections"]


def _inner_edges(windows: Tensor, image_hw: Tuple[int, int]) -> Tensor:
    """(T, 4) bool: which of each window's x0, y0, x1, y1 edges lie inside the image."""
    height, width = image_hw
    return torch.stack(
        [windows[:, 0] > 0, windows[:, 1] > 0, windows[:, 2] < width, windows[:, 3] < height], 1
    )


def cut_by_inner_edge(
    boxes: Tensor, windows: Tensor, image_hw: Tuple[int, int], margin: float
) -> Tensor:
    """(N,) bool: box ``i`` (image XYXY) touches an inner edge of its own window ``windows[i]``."""
    inner = _inner_edges(windows, image_hw)
    near_low = boxes[:, :2] <= windows[:, :2] + margin
    near_high = boxes[:, 2:] >= windows[:, 2:] - margin
    return (torch.cat([near_low, near_high], 1) & inner).any(1)


def covered_whole_elsewhere(
    boxes: Tensor, grid: Tensor, image_hw: Tuple[int, int], margin: float
) -> Tensor:
    """(N,) bool: some window of ``grid`` (all T windows, XYXY) holds the box clear of that
    window's inner edges. The grid is a product of columns and rows, so the test separates into
    (N, columns) and (N, rows) comparisons instead of (N, T)."""
    inner = _inner_edges(grid, image_hw).to(boxes.dtype) * margin
    lo = grid[:, :2] + inner[:, :2]  # the usable part of each window
    hi = grid[:, 2:] - inner[:, 2:]
    covered = []
    for axis in (0, 1):
        spans = torch.unique(torch.stack([lo[:, axis], hi[:, axis]], 1), dim=0)  # (S, 2)
        inside = (boxes[:, axis, None] > spans[None, :, 0]) & (
            boxes[:, axis + 2, None] < spans[None, :, 1]
        )
        covered.append(inside.any(1))
    return covered[0] & covered[1]


def merge_detections(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    windows: Tensor,
    grid: Tensor,
    image_hw: Tuple[int, int],
    nms_thresh: float,
    max_dets: int,
    edge_margin: float = 2.0,
) -> Tuple[Tensor, Tensor, Tensor, int]:
    """The seam rule and class-wise NMS over all tiles of one image (see module doc).

    Args:
        boxes: (N, 4) XYXY in image pixels; scores, classes: (N,); windows: (N, 4) the window
            each box was predicted in; grid: (T, 4) all windows; ``edge_margin < 0`` turns the
            seam rule off.
    Returns:
        kept boxes, scores and classes (best first) and the number of boxes NMS kept before the
        ``max_dets`` cap (so callers can warn when the cap dropped some).
    """
    if edge_margin >= 0 and len(boxes):
        drop = cut_by_inner_edge(boxes, windows, image_hw, edge_margin) & covered_whole_elsewhere(
            boxes, grid, image_hw, edge_margin
        )
        boxes, scores, classes = boxes[~drop], scores[~drop], classes[~drop]
    keep = batched_nms(boxes.float(), scores.float(), classes, nms_thresh)
    found = len(keep)
    keep = keep[:max_dets]
    return boxes[keep], scores[keep], classes[keep], found
