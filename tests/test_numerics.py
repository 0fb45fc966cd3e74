"""Numerics: losses and gradients stay finite at extreme logits and box sizes; property-based
tests (hypothesis) of the integral, box decoding and ATSS."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detectron2.modeling import build_model
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import EventStorage

from conftest import make_instances, tiny_cfg
from gfocal.modeling.atss import atss_assign, pad_gt_boxes
from gfocal.modeling.integral import Integral, boxes_to_distances, distances_to_boxes
from gfocal.modeling.losses import (
    distribution_focal_loss,
    giou_loss,
    quality_focal_loss,
    sigmoid_focal_loss,
)

REG_MAX = 16
EXTREMES = torch.tensor([1e4, -1e4, 0.0, 30.0, -30.0])


def _finite_with_grad(loss: torch.Tensor, leaf: torch.Tensor) -> bool:
    leaf.grad = None
    loss.sum().backward()
    return bool(torch.isfinite(loss).all() and torch.isfinite(leaf.grad).all())


@pytest.mark.parametrize("target", [0.0, 0.3, 1.0])
def test_classification_losses_finite_at_extreme_logits(target):
    logits = EXTREMES.clone().requires_grad_()
    targets = torch.full_like(logits, target)
    assert _finite_with_grad(quality_focal_loss(logits, targets, 2.0), logits)
    assert _finite_with_grad(sigmoid_focal_loss(logits, targets.round(), 0.25, 2.0), logits)


def test_dfl_on_bin_edges_and_at_reg_max():
    """A target exactly on bin k costs -log p_k, also for k = reg_max (all weight on the last bin),
    with finite gradients even for logits of +-1e4."""
    targets = torch.arange(REG_MAX + 1, dtype=torch.float32)
    logits = torch.randn(REG_MAX + 1, REG_MAX + 1).requires_grad_()
    expected = -torch.log_softmax(logits, dim=-1)[targets.long(), targets.long()]
    torch.testing.assert_close(distribution_focal_loss(logits, targets), expected)
    extreme = (torch.randint(0, 2, (REG_MAX + 1, REG_MAX + 1)).float() * 2e4 - 1e4).requires_grad_()
    for t in (targets, targets.clamp(max=REG_MAX - 0.1), targets + 0.5 * (targets < REG_MAX)):
        assert _finite_with_grad(distribution_focal_loss(extreme, t), extreme)


@pytest.mark.parametrize("size", [1.0, 1e-3, 0.0])
def test_giou_finite_for_tiny_and_degenerate_boxes(size):
    pred = torch.tensor([[5.0, 5.0, 5.0 + size, 5.0 + size], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 640.0, 480.0]])
    loss = giou_loss(pred, target)
    assert _finite_with_grad(loss, pred) and ((loss >= 0) & (loss <= 2)).all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_model_losses_finite_with_extreme_head_outputs(sign):
    """Class and box logits of exactly +-1e4 everywhere, GT boxes of 1 pixel and of the whole
    image: every loss and every gradient stays finite."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    with torch.no_grad():
        for conv in (model.head.cls_score, model.head.box_pred):
            conv.weight.mul_(1e-6)
            conv.bias.fill_(sign * 1e4)
        model.head.box_pred.bias[::2] *= -1  # half the bins +1e4, half -1e4
    image = torch.rand(3, 96, 128) * 255
    boxes = [[7.5, 7.5, 8.5, 8.5], [0.0, 0.0, 128.0, 96.0], [40.0, 30.0, 41.0, 31.0]]
    inputs = [{"image": image, "instances": make_instances((96, 128), boxes, [0, 1, 2])}]
    with EventStorage() as storage:
        losses = model(inputs)
        num_pos = storage.history("num_pos_anchors").latest()
    assert num_pos > 0
    total = sum(losses.values())
    total.backward()
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------------
# Property-based tests
# --------------------------------------------------------------------------------------------
finite_logits = st.lists(
    st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=4 * (REG_MAX + 1), max_size=4 * (REG_MAX + 1)
)


@settings(max_examples=30, deadline=None)
@given(finite_logits)
def test_integral_is_a_finite_distance_within_the_bins(values):
    logits = torch.tensor(values).requires_grad_()
    distances = Integral(REG_MAX)(logits)
    assert distances.shape == (4,)
    assert _finite_with_grad(distances, logits)
    assert ((distances >= 0) & (distances <= REG_MAX + 1e-4)).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, REG_MAX), min_size=4, max_size=4), st.sampled_from([30.0, 1e4]))
def test_integral_of_a_peaked_distribution_is_its_bin(bins, peak):
    logits = torch.full((4, REG_MAX + 1), -peak)
    logits[torch.arange(4), bins] = peak
    torch.testing.assert_close(Integral(REG_MAX)(logits.flatten()), torch.tensor(bins, dtype=torch.float32))


box_coords = st.tuples(
    st.floats(0, 500, width=32), st.floats(0, 500, width=32), st.floats(1, 300, width=32), st.floats(1, 300, width=32)
)


@settings(max_examples=40, deadline=None)
@given(box_coords, st.floats(0.01, 0.99), st.floats(0.01, 0.99))
def test_box_decoding_round_trip(box, fx, fy):
    x, y, w, h = box
    boxes = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float64)
    centers = torch.tensor([[x + fx * w, y + fy * h]], dtype=torch.float64)
    distances = boxes_to_distances(centers, boxes)
    assert (distances > 0).all()
    torch.testing.assert_close(distances_to_boxes(centers, distances), boxes)
    clamped = boxes_to_distances(centers, boxes, max_distance=REG_MAX - 0.1)
    assert ((clamped >= 0) & (clamped <= REG_MAX - 0.1)).all()


IMAGE = (96, 128)
STRIDES = [8, 16, 32]


def _anchors():
    generator = DefaultAnchorGenerator(
        sizes=[[8.0 * s] for s in STRIDES], aspect_ratios=[1.0], strides=STRIDES, offset=0.0
    )
    features = [torch.zeros(1, 1, -(-IMAGE[0] // s), -(-IMAGE[1] // s)) for s in STRIDES]
    anchors = generator(features)
    return Boxes.cat(anchors).tensor, [len(a) for a in anchors]


ANCHORS, NUM_PER_LEVEL = _anchors()
gt_strategy = st.lists(
    st.tuples(st.floats(-10, 120), st.floats(-10, 90), st.floats(1, 100), st.floats(1, 80)),
    min_size=1, max_size=8,
)


def _gt_tensor(gts):
    return torch.tensor([[x, y, x + w, y + h] for x, y, w, h in gts], dtype=torch.float32)


@settings(max_examples=30, deadline=None)
@given(gt_strategy, st.integers(1, 12))
def test_atss_positive_centers_lie_inside_their_gt(gts, topk):
    boxes = _gt_tensor(gts)
    gt_boxes, valid = pad_gt_boxes([boxes, boxes[:1]])  # second image: padding must never match
    matched = atss_assign(ANCHORS, NUM_PER_LEVEL, gt_boxes, valid, topk)
    assert matched.shape == (2, len(ANCHORS))
    assert (matched < valid.sum(dim=1, keepdim=True)).all()
    for img in range(2):
        pos = torch.nonzero(matched[img] >= 0).squeeze(1)
        centers = (ANCHORS[pos, :2] + ANCHORS[pos, 2:]) / 2
        gt = gt_boxes[img, matched[img, pos]]
        margins = torch.cat([centers - gt[:, :2], gt[:, 2:] - centers], dim=1)
        assert (margins > 0.01).all()


@settings(max_examples=30, deadline=None)
@given(gt_strategy, st.randoms(use_true_random=False))
def test_atss_is_invariant_to_the_order_of_gts(gts, rnd):
    boxes = _gt_tensor(gts)
    order = list(range(len(boxes)))
    rnd.shuffle(order)
    permuted = boxes[order]
    a = atss_assign(ANCHORS, NUM_PER_LEVEL, *pad_gt_boxes([boxes]), 9)[0]
    b = atss_assign(ANCHORS, NUM_PER_LEVEL, *pad_gt_boxes([permuted]), 9)[0]
    assert torch.equal(a >= 0, b >= 0)
    pos = torch.nonzero(a >= 0).squeeze(1)
    box_a, box_b = boxes[a[pos]], permuted[b[pos]]
    differ = (box_a != box_b).any(dim=1)
    if differ.any():  # only an exact IoU tie between two different GTs may resolve differently
        anchors = Boxes(ANCHORS[pos[differ]])
        iou_a = pairwise_iou(anchors, Boxes(box_a[differ])).diagonal()
        iou_b = pairwise_iou(anchors, Boxes(box_b[differ])).diagonal()
        torch.testing.assert_close(iou_a, iou_b)
