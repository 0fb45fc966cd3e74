"""The inference thresholds of a dense detector (GFL, and detectron2's RetinaNet and FCOS, which
use the same attribute names), read and set through one checked API instead of assigning the
model's attributes from outside."""
import contextlib
from typing import Dict, Iterator, Optional, Union

from torch import nn

__all__ = ["THRESHOLD_ATTRIBUTES", "get_inference_thresholds", "set_inference_thresholds",
           "inference_thresholds"]

# argument name -> the detector's attribute (detectron2's DenseDetector subclasses)
THRESHOLD_ATTRIBUTES = {
    "score_thresh": "test_score_thresh",
    "nms_thresh": "test_nms_thresh",
    "topk_candidates": "test_topk_candidates",
    "max_detections": "max_detections_per_image",
}

Number = Union[int, float]


def _detector(model: nn.Module) -> nn.Module:
    """The detector inside DDP / TTA wrappers (``.module`` / ``.model``)."""
    seen = model
    while not hasattr(seen, "test_score_thresh"):
        inner = getattr(seen, "module", None)
        if inner is None:
            inner = getattr(seen, "model", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"{type(model).__name__} has no inference thresholds "
                            f"({', '.join(THRESHOLD_ATTRIBUTES.values())})")
        seen = inner
    return seen


def get_inference_thresholds(model: nn.Module) -> Dict[str, Number]:
    """The current values, keyed like :func:`set_inference_thresholds`'s arguments."""
    detector = _detector(model)
    return {k: getattr(detector, a) for k, a in THRESHOLD_ATTRIBUTES.items() if hasattr(detector, a)}


def _check(name: str, value: Number) -> Number:
    if name in ("score_thresh", "nms_thresh"):
        value = float(value)
        low_ok = value >= 0.0 if name == "score_thresh" else value > 0.0
        if not (low_ok and value <= 1.0):
            raise ValueError(f"{name}={value}: expected a value in "
                             f"{'[0, 1]' if name == 'score_thresh' else '(0, 1]'}")
        return value
    if int(value) != value or value < 1:
        raise ValueError(f"{name}={value}: expected a positive integer")
    return int(value)


def set_inference_thresholds(
    model: nn.Module,
    score_thresh: Optional[float] = None,
    nms_thresh: Optional[float] = None,
    topk_candidates: Optional[int] = None,
    max_detections: Optional[int] = None,
) -> Dict[str, Number]:
    """Set the given thresholds (None keeps a value) and return the previous values of all.

    ``score_thresh`` filters candidates before NMS (``MODEL.GFL.SCORE_THRESH_TEST``),
    ``nms_thresh`` is the class-wise NMS IoU (``MODEL.GFL.NMS_THRESH_TEST``), ``topk_candidates``
    the candidates kept per level (``MODEL.GFL.TOPK_CANDIDATES_TEST``) and ``max_detections`` the
    detections per image (``TEST.DETECTIONS_PER_IMAGE``)."""
    detector = _detector(model)
    previous = get_inference_thresholds(detector)
    values = {"score_thresh": score_thresh, "nms_thresh": nms_thresh,
              "topk_candidates": topk_candidates, "max_detections": max_detections}
    checked = {k: _check(k, v) for k, v in values.items() if v is not None}
    for k, v in checked.items():
        setattr(detector, THRESHOLD_ATTRIBUTES[k], v)
    return previous


@contextlib.contextmanager
def inference_thresholds(model: nn.Module, **values: Optional[Number]) -> Iterator[nn.Module]:
    """:func:`set_inference_thresholds` for the duration of a ``with`` block, then restored."""
    previous = set_inference_thresholds(model, **values)
    try:
        yield model
    finally:
        set_inference_thresholds(model, **previous)
