"""GFL losses against values worked out by hand from the paper's equations, and their properties."""
import math

import pytest
import torch
from fvcore.nn import sigmoid_focal_loss

from gfocal.modeling.integral import Integral, boxes_to_distances, distances_to_boxes
from gfocal.modeling.losses import (
    aligned_iou,
    centerness_targets,
    distribution_focal_loss,
    giou_loss,
    quality_focal_loss,
)


def test_qfl_hand_values():
    # Eq. (6): -|y - s|^beta ((1 - y) log(1 - s) + y log(s)).
    # x = 0 -> s = 0.5; y = 0.3: BCE = log 2, |0.3 - 0.5|^2 = 0.04.
    # x = log 3 -> s = 0.75; y = 1: BCE = -log 0.75, |1 - 0.75|^2 = 0.0625.
    logits = torch.tensor([0.0, math.log(3.0)])
    targets = torch.tensor([0.3, 1.0])
    expected = torch.tensor([math.log(2.0) * 0.04, -math.log(0.75) * 0.0625])
    assert torch.allclose(quality_focal_loss(logits, targets, beta=2.0), expected, atol=1e-6)
    # beta = 1 scales by |y - s| instead.
    assert quality_focal_loss(torch.tensor([0.0]), torch.tensor([0.3]), beta=1.0).item() == pytest.approx(
        math.log(2.0) * 0.2, abs=1e-6
    )


def test_qfl_minimum_at_sigmoid_equal_target():
    logits = torch.linspace(-6, 6, 4001)
    for y in (0.0, 0.2, 0.6, 0.95):
        loss = quality_focal_loss(logits, torch.full_like(logits, y))
        best = logits[loss.argmin()].sigmoid().item()
        assert best == pytest.approx(y, abs=5e-3)


def test_qfl_equals_focal_loss_without_alpha_for_binary_targets():
    torch.manual_seed(0)
    logits = torch.randn(50, 7) * 3
    targets = (torch.rand(50, 7) > 0.7).float()
    for gamma in (0.5, 2.0, 3.0):
        qfl = quality_focal_loss(logits, targets, beta=gamma)
        fl = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=gamma, reduction="none")
        assert torch.allclose(qfl, fl, atol=1e-6)


def test_dfl_hand_values():
    # Eq. (7): -((y_{i+1} - y) log S_i + (y - y_i) log S_{i+1}).
    # Uniform over 17 bins: every log S = -log 17, weights sum to 1.
    assert distribution_focal_loss(torch.zeros(1, 17), torch.tensor([2.3])).item() == pytest.approx(
        math.log(17.0), abs=1e-5
    )
    # Bins 0, 1, 2 with probabilities 1/6, 2/6, 3/6; y = 1.25 -> 0.75 * -log(1/3) + 0.25 * -log(1/2).
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0]]))
    expected = 0.75 * math.log(3.0) + 0.25 * math.log(2.0)
    assert distribution_focal_loss(logits, torch.tensor([1.25])).item() == pytest.approx(expected, abs=1e-5)
    # A target exactly at reg_max puts all the weight on the last bin.
    assert distribution_focal_loss(logits, torch.tensor([2.0])).item() == pytest.approx(math.log(2.0), abs=1e-5)
    # A target exactly on a bin edge puts all the weight on that bin.
    assert distribution_focal_loss(logits, torch.tensor([1.0])).item() == pytest.approx(math.log(3.0), abs=1e-5)


def test_integral_hand_value():
    integral = Integral(reg_max=2)
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0])).repeat(4)  # 4 sides x 3 bins
    assert torch.allclose(integral(logits), torch.full((4,), 4.0 / 3.0), atol=1e-6)


def test_dfl_minimum_where_integral_equals_target():
    reg_max, y = 16, 3.4
    logits = torch.zeros(1, reg_max + 1, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.5)
    for _ in range(1000):
        optimizer.zero_grad()
        distribution_focal_loss(logits, torch.tensor([y])).sum().backward()
        optimizer.step()
    prob = logits.detach().softmax(-1)[0]
    expected_value = Integral(reg_max)(logits.detach().repeat(1, 4))[0, 0].item()
    assert expected_value == pytest.approx(y, abs=0.02)
    # The mass concentrates on the two bins around y, in the ratio 0.6 : 0.4.
    assert prob[3].item() == pytest.approx(0.6, abs=0.02)
    assert prob[4].item() == pytest.approx(0.4, abs=0.02)


@pytest.mark.parametrize("logit", [-50.0, 50.0])
def test_finite_gradients_at_extremes(logit):
    reg_max = 16
    logits = torch.full((4, reg_max + 1), logit)
    logits[:, 0] = -logit
    logits.requires_grad_(True)
    targets = torch.tensor([0.0, reg_max - 0.1, float(reg_max), 7.5])
    loss = distribution_focal_loss(logits, targets).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()

    cls = torch.full((3, 5), logit, requires_grad=True)
    qfl = quality_focal_loss(cls, torch.tensor([0.0, 1.0, 0.5]).repeat(5, 1).t()).sum()
    qfl.backward()
    assert torch.isfinite(qfl) and torch.isfinite(cls.grad).all()


def test_giou_and_iou_hand_values():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    # intersection 1, union 7, enclosing box 9: GIoU = 1/7 - 2/9.
    assert aligned_iou(pred, target).item() == pytest.approx(1 / 7, abs=1e-6)
    assert giou_loss(pred, target).item() == pytest.approx(1 - (1 / 7 - 2 / 9), abs=1e-6)
    assert giou_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)


def test_box_distance_round_trip_and_centerness():
    centers = torch.tensor([[5.0, 5.0]])
    boxes = torch.tensor([[1.0, 3.0, 9.0, 6.0]])
    distances = boxes_to_distances(centers, boxes)
    assert distances.tolist() == [[4.0, 2.0, 4.0, 1.0]]
    assert torch.equal(distances_to_boxes(centers, distances), boxes)
    # sqrt(min(4,4)/max(4,4) * min(2,1)/max(2,1)) = sqrt(0.5)
    assert centerness_targets(distances).item() == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert boxes_to_distances(centers, boxes, max_distance=3.9).max().item() == pytest.approx(3.9)
