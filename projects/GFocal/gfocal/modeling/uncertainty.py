"""Per-detection edge distributions and an uncertainty figure derived from them."""
import math

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["edge_distributions", "distribution_uncertainty"]


def edge_distributions(box_logits: Tensor, reg_max: int) -> Tensor:
    """Box logits (N, 4 * (reg_max + 1)) -> probabilities (N, 4, reg_max + 1) over the bins
    0..reg_max (stride units) of the sides l, t, r, b; softmax in float32."""
    return F.softmax(box_logits.float().reshape(-1, 4, reg_max + 1), dim=-1)


def distribution_uncertainty(distributions: Tensor) -> Tensor:
    """Mean over the four sides of the normalised entropy ``-sum p log p / log(bins)``.

    Args:
        distributions: (N, 4, bins) probabilities.
    Returns:
        (N,) values in [0, 1]: 0 when every side puts all its mass on one bin, 1 when every side
        is uniform (the paper's Fig. 3: flat distributions mark ambiguous, uncertain edges).
    """
    bins = distributions.shape[-1]
    p = distributions.float()
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(dim=-1)
    return (entropy / math.log(bins)).clamp(0.0, 1.0).mean(dim=-1)
