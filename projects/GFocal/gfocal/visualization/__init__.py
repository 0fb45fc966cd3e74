"""Drawings of detections (over their ground truth) and of the edge distributions."""
from .detections import draw_dataset_predictions, draw_dataset_results, draw_detections
from .distributions import draw_distributions

__all__ = ["draw_dataset_predictions", "draw_dataset_results", "draw_detections", "draw_distributions"]
