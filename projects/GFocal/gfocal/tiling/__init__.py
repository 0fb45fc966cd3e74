"""Tiling of large images into square windows, for training and for prediction."""
from .grid import check_tiling, tile_boxes, tile_grid, tile_windows

__all__ = ["check_tiling", "tile_boxes", "tile_grid", "tile_windows"]
