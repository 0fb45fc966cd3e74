"""The tiling grid of a whole image: square patches with a given overlap, checked against the model."""
from typing import Tuple

import numpy as np

from ..data.tree_crowns import tile_grid

__all__ = ["check_tiling", "tile_windows"]


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
