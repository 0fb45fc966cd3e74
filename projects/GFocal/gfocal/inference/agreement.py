"""Box agreement between two predictors' detections of the same image: the check that two
contenders which run the same model really do (benchmarks/tiled_predict.py; backend parity)."""
from typing import Optional

import numpy as np
import torch
from torchvision.ops import box_iou

__all__ = ["box_agreement"]


def box_agreement(
    ref_boxes, boxes, iou: float = 0.9, ref_scores: Optional[np.ndarray] = None, score: float = 0.0
) -> float:
    """Fraction of the reference boxes (those with ``ref_scores >= score`` when scores are given)
    that a box of ``boxes`` overlaps with IoU >= ``iou``; 1.0 when there is no reference box."""
    ref = torch.as_tensor(np.asarray(ref_boxes), dtype=torch.float32).reshape(-1, 4)
    if ref_scores is not None:
        ref = ref[torch.as_tensor(np.asarray(ref_scores)) >= score]
    other = torch.as_tensor(np.asarray(boxes), dtype=torch.float32).reshape(-1, 4)
    if len(ref) == 0:
        return 1.0
    if len(other) == 0:
        return 0.0
    return float((box_iou(ref, other).max(dim=1).values >= iou).float().mean())
