"""Drawings of detections."""
from .distributions import draw_distributions

__all__ = ["draw_distributions"]
