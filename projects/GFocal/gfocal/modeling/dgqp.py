"""GFLv2's Distribution-Guided Quality Predictor (Li et al., "Generalized Focal Loss V2", CVPR 2021).

The localisation quality of a box is read from the shape of its four edge distributions: a sharp
peak means a confident edge. Per edge the ``topk`` largest bin probabilities and (with
``add_mean``) their mean form the statistics ``F`` (paper Eq. 4, ``4 * (topk + 1)`` values per
location); two 1x1 convs with a ReLU between map ``F`` to one quality logit (Eq. 5; the sigmoid is
applied by the caller, so that the loss can take its log exactly). The distribution is not
detached: the quality loss also trains the box branch, as in the reference.
"""
import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["DGQP", "distribution_statistics"]


def distribution_statistics(box_logits: Tensor, reg_max: int, topk: int, add_mean: bool) -> Tensor:
    """Top-k statistics of the edge distributions (paper Eq. 4).

    Args:
        box_logits: (N, 4 * (reg_max + 1), H, W) distribution logits, edges l, t, r, b.
        topk: how many of the largest bin probabilities to keep per edge, in descending order.
        add_mean: append the mean of those ``topk`` probabilities to each edge's values.

    Returns:
        (N, 4 * (topk + add_mean), H, W) float32: for each edge in turn its ``topk`` probabilities
        then (``add_mean``) their mean; the softmax runs in float32 (also under autocast).
    """
    n, c, h, w = box_logits.shape
    if not torch.jit.is_tracing() and c != 4 * (reg_max + 1):  # channels are fixed when traced
        raise ValueError(
            f"box logits have {c} channels, expected 4 * (MODEL.GFL.REG_MAX + 1) = {4 * (reg_max + 1)}"
        )
    prob = F.softmax(box_logits.float().reshape(n, 4, reg_max + 1, h, w), dim=2)
    stats = prob.topk(topk, dim=2).values
    if add_mean:
        stats = torch.cat([stats, stats.mean(dim=2, keepdim=True)], dim=2)
    return stats.reshape(n, -1, h, w)


class DGQP(nn.Module):
    """Distribution statistics -> 1x1 conv (``channels``) -> ReLU -> 1x1 conv (1): a quality logit
    per location, shared across FPN levels. Convs are initialised normal(std=0.01), bias 0."""

    def __init__(self, reg_max: int, topk: int = 4, channels: int = 64, add_mean: bool = True):
        super().__init__()
        if not 1 <= topk <= reg_max + 1:
            raise ValueError(f"MODEL.GFL.DGQP.TOPK={topk} must be in [1, REG_MAX + 1 = {reg_max + 1}]")
        self.reg_max = reg_max
        self.topk = topk
        self.add_mean = add_mean
        self.hidden = nn.Conv2d(4 * (topk + int(add_mean)), channels, 1)
        self.out = nn.Conv2d(channels, 1, 1)
        for conv in (self.hidden, self.out):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, 0.0)

    def forward(self, box_logits: Tensor) -> Tensor:
        """(N, 4 * (reg_max + 1), H, W) box logits -> (N, 1, H, W) quality logits."""
        stats = distribution_statistics(box_logits, self.reg_max, self.topk, self.add_mean)
        return self.out(F.relu(self.hidden(stats.to(self.hidden.weight.dtype))))
