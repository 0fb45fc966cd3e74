"""Whole-image (tiled) prediction: grid, window reader, batched predictor, seam merge, writers."""
from ..tiling import check_tiling, tile_windows
from .merge import merge_detections
from .tiled import ArrayReader, TiledPredictor, TiledResult
from .reader import IMAGE_EXTENSIONS, ImageReadError, WindowReader, open_image

__all__ = [
    "ArrayReader",
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "TiledPredictor",
    "TiledResult",
    "WindowReader",
    "check_tiling",
    "merge_detections",
    "open_image",
    "tile_windows",
]
