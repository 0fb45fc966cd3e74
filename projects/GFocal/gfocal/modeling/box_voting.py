"""Distribution voting: refine the boxes kept by NMS from the candidates it suppressed, weighting
every edge of every candidate by how sharp GFL's general distribution of that edge is.

He et al., "Bounding Box Regression with Uncertainty for Accurate Object Detection" (CVPR 2019),
Sec. 3.3 "variance voting": each kept box b takes, per coordinate, the average of the coordinates
of the candidates b_i of its class that overlap it, weighted by p_i / sigma_i^2 with
p_i = exp(-(1 - IoU(b_i, b))^2 / sigma_t) and sigma_i^2 the variance predicted for that
coordinate (a Gaussian there). GFL predicts a general distribution per edge (softmax over
REG_MAX + 1 bins, Eq. 5 takes its mean); its variance is the uncertainty used here, in pixels^2
(bins^2 x stride^2). Unlike He et al. the candidate's score also multiplies its weight
(``MODEL.GFL.BOX_VOTING``, ``gfocal/config.py``). Candidates: the scored, top-k boxes before NMS.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from detectron2.structures import Boxes, pairwise_iou

__all__ = ["DistributionVoting", "edge_variances", "WEIGHTINGS"]

WEIGHTINGS = ("variance", "score")
_EPS = 1e-6  # px^2: a one-hot distribution has variance 0


def edge_variances(box_logits: Tensor, reg_max: int) -> Tensor:
    """Variance (bins^2) of each edge's distribution: box logits (N, 4 (REG_MAX + 1)) -> (N, 4)."""
    probs = F.softmax(box_logits.float().reshape(-1, 4, reg_max + 1), dim=-1)
    bins = torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)
    mean = (probs * bins).sum(-1)
    return ((probs * bins**2).sum(-1) - mean**2).clamp(min=0.0)


class DistributionVoting:
    """Per kept box and edge: the weighted mean of that edge over the candidates of its class
    with IoU >= ``iou_thresh``, weights ``score x exp(-(1 - IoU)^2 / sigma) / (variance + eps)``
    (``weighting="variance"``) or without the variance (``"score"``)."""

    def __init__(self, iou_thresh: float = 0.5, sigma: float = 0.02, weighting: str = "variance"):
        if not 0.0 <= iou_thresh <= 1.0:
            raise ValueError(f"MODEL.GFL.BOX_VOTING.IOU_THRESH={iou_thresh} must be in [0, 1]")
        if not sigma > 0:
            raise ValueError(f"MODEL.GFL.BOX_VOTING.SIGMA={sigma} must be > 0")
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"MODEL.GFL.BOX_VOTING.WEIGHTING={weighting!r} is not one of {list(WEIGHTINGS)}"
            )
        self.iou_thresh = iou_thresh
        self.sigma = sigma
        self.weighting = weighting

    @classmethod
    def from_config(cls, cfg) -> Optional["DistributionVoting"]:
        """None unless ``MODEL.GFL.BOX_VOTING.ENABLED``."""
        voting = cfg.MODEL.GFL.BOX_VOTING
        if not voting.ENABLED:
            return None
        if voting.WEIGHTING == "variance" and cfg.MODEL.GFL.BOX_REPRESENTATION != "distribution":
            raise ValueError(
                "MODEL.GFL.BOX_VOTING.WEIGHTING='variance' reads the edge distributions: it needs "
                "MODEL.GFL.BOX_REPRESENTATION='distribution' (got "
                f"{cfg.MODEL.GFL.BOX_REPRESENTATION!r}); use WEIGHTING 'score' for Dirac boxes"
            )
        return cls(voting.IOU_THRESH, voting.SIGMA, voting.WEIGHTING)

    @property
    def needs_variances(self) -> bool:
        return self.weighting == "variance"

    def __call__(
        self,
        boxes: Tensor,
        scores: Tensor,
        classes: Tensor,
        keep: Tensor,
        variances: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            boxes, scores, classes: (N, 4) XYXY, (N,), (N,) of all candidates of one image.
            keep: (K,) indices of the candidates kept by NMS.
            variances: (N, 4) per-edge variances in pixels^2 (needed for "variance").
        Returns:
            (K, 4) the voted boxes of ``keep``.
        """
        kept = boxes[keep]
        if keep.numel() == 0 or boxes.shape[0] == 0:
            return kept
        ious = pairwise_iou(Boxes(kept), Boxes(boxes))  # (K, N)
        member = (ious >= self.iou_thresh) & (classes[keep][:, None] == classes[None, :])
        weight = torch.exp(-((1.0 - ious) ** 2) / self.sigma) * scores[None, :] * member
        weight = weight[:, :, None].expand(-1, -1, 4)  # (K, N, 4) per edge
        if self.needs_variances:
            if variances is None:
                raise ValueError("distribution voting with weighting 'variance' needs variances")
            weight = weight / (variances[None, :, :] + _EPS)
        total = weight.sum(dim=1)  # (K, 4); > 0: every kept box is its own member (IoU 1)
        voted = (weight * boxes[None, :, :]).sum(dim=1) / total.clamp(min=1e-12)
        return torch.where(total > 0, voted, kept)
