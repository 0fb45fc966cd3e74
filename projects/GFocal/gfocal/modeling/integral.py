"""The general distribution of a box edge, its integral, and box decoding from anchor centers."""
import torch
from torch import Tensor, nn
from torch.nn import functional as F


class Integral(nn.Module):
    """Expected value of the discretised edge distribution (paper Eq. 5):
    ``y_hat = sum_i P(y_i) * y_i`` with ``P = softmax(logits)`` over the bins ``y_i = 0..reg_max``.

    Written as an element-wise product with the bin values followed by a sum (not ``F.linear`` with
    a 1-D weight), so that ONNX exporters and TensorRT see plain Mul + ReduceSum. The softmax and
    the sum run in float32 under mixed precision: with 17 bins, half precision loses the target.
    """

    def __init__(self, reg_max: int):
        super().__init__()
        self.reg_max = reg_max
        self.register_buffer("project", torch.arange(reg_max + 1, dtype=torch.float32), False)

    def forward(self, logits: Tensor) -> Tensor:
        """logits: (..., 4 * (reg_max + 1)) -> distances (..., 4) in bins (stride units)."""
        prob = F.softmax(logits.float().unflatten(-1, (4, self.reg_max + 1)), dim=-1)
        # The reshape restates the shape the sum already has: ONNX Runtime's ReduceSum returns an
        # empty input unreduced ((0, 4, 17), not (0, 4)), so an exported model would fail on an
        # image without a single candidate box.
        return (prob * self.project).sum(dim=-1).reshape(logits.shape[:-1] + (4,))


def distances_to_boxes(centers: Tensor, distances: Tensor) -> Tensor:
    """(l, t, r, b) distances from points (..., 2) to XYXY boxes (..., 4)."""
    return torch.cat([centers - distances[..., :2], centers + distances[..., 2:]], dim=-1)


def boxes_to_distances(centers: Tensor, boxes: Tensor, max_distance: float = None) -> Tensor:
    """XYXY boxes (..., 4) to (l, t, r, b) distances from points (..., 2).

    With ``max_distance`` the distances are clamped to ``[0, max_distance]`` (DFL targets use
    ``reg_max - 0.1`` so that the right bin ``floor(y) + 1`` exists).
    """
    distances = torch.cat([centers - boxes[..., :2], boxes[..., 2:] - centers], dim=-1)
    if max_distance is not None:
        distances = distances.clamp(min=0, max=max_distance)
    return distances
