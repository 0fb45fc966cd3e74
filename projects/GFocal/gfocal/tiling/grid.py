"""The one tiling grid of the package: square windows with a given overlap over an image, and the
rule for boxes cut by a window. Training tiles (:mod:`gfocal.data.tree_crowns`) and prediction
windows (:mod:`gfocal.inference.tiled`) both come from :func:`tile_grid`."""
from typing import List, Tuple

import numpy as np

__all__ = ["check_tiling", "tile_boxes", "tile_grid", "tile_windows"]


def check_tiling(patch_size: int, overlap: int, min_patch: int) -> None:
    """Refuse a patch smaller than ``min_patch`` (the model's coarsest stride) or an overlap that
    is negative or not below the patch (the grid would never advance)."""
    if patch_size < min_patch:
        raise ValueError(
            f"--patch-size {patch_size} is below the model's coarsest stride {min_patch}: "
            "a patch must hold at least one cell of every feature level"
        )
    if not 0 <= overlap < patch_size:
        raise ValueError(f"--overlap {overlap} must be in [0, --patch-size {patch_size})")


def tile_windows(image_hw: Tuple[int, int], patch_size: int, overlap: int) -> np.ndarray:
    """(T, 4) int XYXY windows covering the image, row by row.

    Per axis the fewest patches whose spacing is at most ``patch_size - overlap``, spread evenly
    from border to border (the grid of the tree-crown tiles): patches never extend past the image
    (an image smaller than a patch is one window of its own size), so neighbours overlap by
    ``overlap`` or a little more.
    """
    return tile_grid(image_hw, patch_size, overlap).astype(np.int64)


def _starts(length: int, tile: int, step: int) -> List[int]:
    """The fewest starts with spacing <= ``step`` that cover ``length``, spread evenly."""
    if length <= tile:
        return [0]
    count = -(-(length - tile) // step) + 1
    return np.linspace(0, length - tile, count).round().astype(int).tolist()


def tile_grid(image_hw: Tuple[int, int], tile_size: int, overlap: int) -> np.ndarray:
    """(T, 4) XYXY tile windows covering an image; tiles never extend past its border."""
    height, width = image_hw
    step = tile_size - overlap
    ys = _starts(height, tile_size, step)
    xs = _starts(width, tile_size, step)
    return np.asarray(
        [[x, y, min(x + tile_size, width), min(y + tile_size, height)] for y in ys for x in xs],
        dtype=np.float64,
    )


def tile_boxes(
    boxes: np.ndarray, window: np.ndarray, min_visible: float, min_side: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Boxes of one tile in tile coordinates. A box is clipped to the window; it stays a normal
    annotation when at least ``min_visible`` of its area lies inside, becomes ``iscrowd`` (ignored
    by training and by the COCO evaluation) when less does, and is dropped when the clipped part is
    thinner than ``min_side`` pixels.

    Returns:
        (K, 4) clipped XYXY boxes relative to the tile and (K,) bool ``iscrowd`` flags.
    """
    x0, y0, x1, y1 = window
    clipped = np.stack(
        [
            boxes[:, 0].clip(x0, x1),
            boxes[:, 1].clip(y0, y1),
            boxes[:, 2].clip(x0, x1),
            boxes[:, 3].clip(y0, y1),
        ],
        axis=1,
    )
    w = clipped[:, 2] - clipped[:, 0]
    h = clipped[:, 3] - clipped[:, 1]
    keep = (w >= max(min_side, 1e-6)) & (h >= max(min_side, 1e-6))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    visible = (w * h) / area
    crowd = visible < min_visible
    return clipped[keep] - np.array([x0, y0, x0, y0]), crowd[keep]
