"""Edge distributions and uncertainty as Instances fields (MODEL.GFL.OUTPUT_DISTRIBUTIONS), their
drawing (gfocal.visualization.distributions, tools/plot_distributions.py) and tools/demo.py."""
import math
import os
import sys

import cv2
import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

import gfocal
from gfocal.modeling.uncertainty import distribution_uncertainty, edge_distributions
from gfocal.visualization.distributions import draw_distributions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs/mmdet/gfl_R_50_FPN_1x.yaml")
# A small random model whose scores (prior 0.5) pass the threshold.
SMALL = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
         "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.GFL.NUM_CONVS", "1", "MODEL.GFL.PRIOR_PROB", "0.5",
         "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192", "MODEL.DEVICE", "cpu"]


def test_peaked_distribution_is_less_uncertain_than_flat():
    reg_max = 16
    flat = torch.zeros(1, 4 * (reg_max + 1))
    peaked = torch.zeros(1, 4, reg_max + 1)
    peaked[..., 5] = 8.0
    mixed = peaked.clone()
    mixed[:, 2] = 0.0  # one flat side
    logits = torch.cat([flat, peaked.flatten(1), mixed.flatten(1)])
    dists = edge_distributions(logits, reg_max)
    assert dists.shape == (3, 4, reg_max + 1)
    assert torch.allclose(dists.sum(-1), torch.ones(3, 4))
    u = distribution_uncertainty(dists)
    assert u.shape == (3,)
    assert u[0] == pytest.approx(1.0, abs=1e-6)
    assert u[1] < 0.05 and u[1] < u[2] < u[0]
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 3, 16, 9]]), reg_max + 1).float()
    assert distribution_uncertainty(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    two_bins = torch.zeros(1, 4, reg_max + 1)
    two_bins[..., 4:6] = 0.5
    assert distribution_uncertainty(two_bins).item() == pytest.approx(math.log(2) / math.log(17), abs=1e-6)


def _model(output_distributions: bool):
    cfg = get_cfg()
    gfocal.add_gfl_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(SMALL + ["MODEL.GFL.OUTPUT_DISTRIBUTIONS", str(output_distributions)])
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def detections():
    image = torch.rand(3, 120, 160, generator=torch.Generator().manual_seed(1)) * 255
    inputs = [{"image": image, "height": 120, "width": 160}]
    with torch.no_grad():
        plain = _model(False)(inputs)[0]["instances"]
        with_dists = _model(True)(inputs)[0]["instances"]
    return plain, with_dists


def test_fields_off_by_default_and_outputs_unchanged(detections):
    plain, with_dists = detections
    assert len(plain) > 0
    assert not plain.has("pred_distributions") and not plain.has("pred_uncertainty")
    assert torch.equal(plain.pred_boxes.tensor, with_dists.pred_boxes.tensor)
    assert torch.equal(plain.scores, with_dists.scores)


def test_fields_shapes_and_ranges(detections):
    _, inst = detections
    n = len(inst)
    assert inst.pred_distributions.shape == (n, 4, 17)
    assert torch.allclose(inst.pred_distributions.sum(-1), torch.ones(n, 4), atol=1e-5)
    assert inst.pred_uncertainty.shape == (n,)
    assert ((inst.pred_uncertainty >= 0) & (inst.pred_uncertainty <= 1)).all()
    assert torch.allclose(inst.pred_uncertainty, distribution_uncertainty(inst.pred_distributions))


def test_dirac_box_with_distributions_is_refused():
    cfg = get_cfg()
    gfocal.add_gfl_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(SMALL + ["MODEL.GFL.OUTPUT_DISTRIBUTIONS", "True", "MODEL.GFL.BOX_REPRESENTATION",
                                 "dirac", "MODEL.GFL.CLS_LOSS", "FL", "MODEL.GFL.QUALITY", "none",
                                 "MODEL.GFL.USE_DFL", "False"])
    with pytest.raises(ValueError, match="OUTPUT_DISTRIBUTIONS"):
        build_model(cfg)


def test_draw_distributions_png(detections, tmp_path):
    plain, inst = detections
    out = tmp_path / "d.png"
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    draw_distributions(image, inst, [0, 1], str(out), dpi=40)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cv2.imread(str(out)).shape[0] > 100
    with pytest.raises(ValueError, match="OUTPUT_DISTRIBUTIONS"):
        draw_distributions(image, plain, [0], str(out))
    with pytest.raises(IndexError, match="out of range"):
        draw_distributions(image, inst, [len(inst)], str(out))


@pytest.fixture(scope="module")
def tools():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import demo
        import plot_distributions
    finally:
        sys.path.pop(0)
    return demo, plot_distributions


def test_demo_and_plot_commands(tools, tmp_path):
    demo, plot_distributions = tools
    image = (np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)
    src = tmp_path / "in.png"
    cv2.imwrite(str(src), image)
    common = ["--config-file", CONFIG, "--confidence-threshold", "0.05", "--device", "cpu"]
    out_dir = tmp_path / "demo"
    assert demo.main(common + ["--input", str(tmp_path), "--output", str(out_dir) + os.sep] + SMALL) == 0
    drawn = cv2.imread(str(out_dir / "in.png"))
    assert drawn is not None and drawn.shape == image.shape

    # An mmdetection checkpoint straight into the demo: converted once, then loaded.
    from test_conversion import mmdet_gfl_state_dict

    mmdet_file = tmp_path / "gfl_mmdet.pth"
    torch.save({"state_dict": mmdet_gfl_state_dict(depth=18, fpn_channels=64, stacked_convs=1,
                                                   make=torch.zeros)}, mmdet_file)
    converted_dir = tmp_path / "converted"
    args = common + ["--mmdet-weights", str(mmdet_file), "--converted-dir", str(converted_dir),
                     "--input", str(src), "--output", str(tmp_path / "mm.png")] + SMALL
    assert demo.main(args) == 0
    assert (converted_dir / "gfl_mmdet_d2.pth").is_file() and (tmp_path / "mm.png").is_file()
    png = tmp_path / "dists.png"
    plot_args = ["--input", str(src), "--output", str(png), "--top-k", "2", "--dpi", "40"]
    assert plot_distributions.main(common + plot_args + SMALL) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
