"""Distribution voting (gfocal/modeling/box_voting.py, MODEL.GFL.BOX_VOTING.*)."""
import math

import pytest
import torch

from detectron2.modeling import build_model

from conftest import tiny_cfg
from gfocal.model_io.export import tracing_adapter
from gfocal.modeling.box_voting import DistributionVoting, edge_variances


def _logits_for(probs):
    """Box logits (N, 4 (R + 1)) whose softmax is ``probs`` (N, 4, R + 1)."""
    return probs.clamp(min=1e-12).log().reshape(len(probs), -1)


def test_edge_variances():
    probs = torch.zeros(2, 4, 5)
    probs[0, :, 2] = 1.0  # one-hot: variance 0
    probs[1, :, 1] = probs[1, :, 2] = 0.5  # two neighbouring bins: variance 1/4
    var = edge_variances(_logits_for(probs), reg_max=4)
    assert torch.allclose(var[0], torch.zeros(4), atol=1e-6)
    assert torch.allclose(var[1], torch.full((4,), 0.25), atol=1e-6)


def test_voting_weights_each_edge_by_its_sharpness():
    kept = [10.0, 10.0, 50.0, 50.0]
    boxes = torch.tensor([kept, [12.0, 10.0, 50.0, 50.0], [10.0, 10.0, 50.0, 54.0],
                          [30.0, 30.0, 90.0, 90.0], [12.0, 10.0, 50.0, 50.0]])
    scores = torch.tensor([0.9, 0.8, 0.8, 0.7, 0.9])
    classes = torch.tensor([0, 0, 0, 0, 1])
    var = torch.ones(5, 4)
    var[1, 0] = 0.01  # candidate 1 is sure of its left edge
    var[2, 3] = 100.0  # candidate 2 is unsure of its bottom edge
    keep = torch.tensor([0])
    voting = DistributionVoting(iou_thresh=0.5, sigma=0.02)
    out = voting(boxes, scores, classes, keep, var)[0]
    iou1, iou2 = 38 * 40 / (40 * 40), 40 * 40 / (40 * 44)
    w0 = 0.9
    w1 = 0.8 * math.exp(-((1 - iou1) ** 2) / 0.02) / 0.01
    w2 = 0.8 * math.exp(-((1 - iou2) ** 2) / 0.02)
    assert out[0].item() == pytest.approx((w0 * 10 + w1 * 12 + w2 * 10) / (w0 + w1 + w2), rel=1e-5)
    assert out[0] > 11.5  # pulled to the sharp candidate's left edge
    assert out[1].item() == pytest.approx(10.0) and out[2].item() == pytest.approx(50.0)
    assert 50.0 < out[3] < 50.05  # the unsure bottom edge barely moves it
    # Box 3 (IoU < 0.5) and box 4 (another class) take no part: without box 1 and 2 no change.
    alone = voting(boxes[[0, 3, 4]], scores[[0, 3, 4]], classes[[0, 3, 4]], keep, var[[0, 3, 4]])
    assert torch.equal(alone[0], boxes[0])
    # "score": the same weight for the four edges (no variances).
    plain = DistributionVoting(0.5, 0.02, "score")(boxes, scores, classes, keep)[0]
    assert plain[0] < out[0] and plain[3] > out[3]
    assert voting(boxes, scores, classes, keep[:0], var).shape == (0, 4)


def test_bad_keys():
    with pytest.raises(ValueError, match="BOX_VOTING.SIGMA"):
        DistributionVoting(sigma=0.0)
    with pytest.raises(ValueError, match="BOX_VOTING.WEIGHTING"):
        DistributionVoting(weighting="mean")
    cfg = tiny_cfg(**{"MODEL.GFL.BOX_VOTING.ENABLED": True, "MODEL.GFL.BOX_REPRESENTATION": "dirac",
                      "MODEL.GFL.USE_DFL": False})
    with pytest.raises(ValueError, match="BOX_REPRESENTATION='distribution'"):
        DistributionVoting.from_config(cfg)


def test_gfl_with_voting_moves_boxes_only_and_is_refused_by_export():
    cfg = tiny_cfg(**{"MODEL.GFL.SCORE_THRESH_TEST": 0.0})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, 96, 128, generator=g) * 255}]
    assert model.box_voting is None
    with torch.no_grad():
        plain = model(inputs)[0]["instances"]
        model.box_voting = DistributionVoting(0.5, 0.02)
        voted = model(inputs)[0]["instances"]
    assert torch.equal(voted.scores, plain.scores) and torch.equal(voted.pred_classes, plain.pred_classes)
    moved = (voted.pred_boxes.tensor - plain.pred_boxes.tensor).abs().amax(dim=1)
    assert (moved > 1e-3).any() and moved.max() < 64
    with pytest.raises(ValueError, match="BOX_VOTING.ENABLED False"):
        tracing_adapter(model, inputs[0]["image"])
