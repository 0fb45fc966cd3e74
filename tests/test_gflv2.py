"""GFLv2 (MODEL.GFL.QUALITY 'dgqp'): the Distribution-Guided Quality Predictor against values
derived by hand, QFL on probabilities against the paper's formula (also at 0 and 1, and under
autocast), training on the tree-crown config, conversion of the official checkpoint layout and
export."""
import math
import os

import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.events import EventStorage

import gfocal
from gfocal.config import check_gfl_config
from conftest import REPO_ROOT, make_instances, tiny_cfg
from gfocal import model_zoo
from gfocal.model_io.conversion import (
    ConversionError,
    check_against_model,
    check_dgqp_config,
    convert_mmdet_gfl_checkpoint,
    convert_mmdet_gfl_state_dict,
)
from gfocal.model_io.export import compare_detections, export_onnx, export_torchscript
from gfocal.modeling.dgqp import DGQP, distribution_statistics
from gfocal.modeling.losses import quality_focal_loss_on_log_scores, quality_focal_loss_on_scores
from gfocal.utils import deform_conv_build_error
from test_conversion import mmdet_gfl_state_dict
from test_export import ONNX_TOL, TS_TOL, _eager, _image, _op_types
from test_model import _best_iou_per_gt, _train

DGQP_OPTS = {"MODEL.GFL.QUALITY": "dgqp"}

# Three edge distributions over 5 bins (reg_max 4), and their statistics derived by hand:
# the 4 largest probabilities in descending order, then their mean.
EDGES = {
    "l": ([0.1, 0.2, 0.4, 0.2, 0.1], [0.4, 0.2, 0.2, 0.1], 0.225),
    "t": ([0.05, 0.6, 0.3, 0.04, 0.01], [0.6, 0.3, 0.05, 0.04], 0.2475),
    "r": ([0.7, 0.1, 0.1, 0.05, 0.05], [0.7, 0.1, 0.1, 0.05], 0.2375),
    "b": ([0.2, 0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2], 0.2),
}


def _box_logits(h: int = 2, w: int = 3, at=(1, 2)) -> torch.Tensor:
    """(1, 20, h, w) logits: uniform distributions everywhere except EDGES at location ``at``."""
    logits = torch.zeros(1, 4 * 5, h, w)
    for side, (probs, _, _) in enumerate(EDGES.values()):
        logits[0, side * 5 : side * 5 + 5, at[0], at[1]] = torch.tensor(probs).log() + 3.0
    return logits


def test_statistics_by_hand():
    stats = distribution_statistics(_box_logits(), reg_max=4, topk=4, add_mean=True)
    assert stats.shape == (1, 4 * 5, 2, 3) and stats.dtype == torch.float32
    expected = []
    for _, top, mean in EDGES.values():
        expected += top + [mean]  # per edge l, t, r, b: top-4 descending, then their mean
    torch.testing.assert_close(stats[0, :, 1, 2], torch.tensor(expected), rtol=0, atol=1e-6)
    # Elsewhere the distributions are uniform over 5 bins: every statistic is 1/5.
    torch.testing.assert_close(stats[0, :, 0, 0], torch.full((20,), 0.2), rtol=0, atol=1e-6)

    no_mean = distribution_statistics(_box_logits(), reg_max=4, topk=2, add_mean=False)
    assert no_mean.shape == (1, 8, 2, 3)
    expected = [v for _, top, _ in EDGES.values() for v in top[:2]]
    torch.testing.assert_close(no_mean[0, :, 1, 2], torch.tensor(expected), rtol=0, atol=1e-6)


def test_statistics_refuse_wrong_channels():
    with pytest.raises(ValueError, match="REG_MAX"):
        distribution_statistics(torch.zeros(1, 4 * 17, 2, 2), reg_max=4, topk=4, add_mean=True)
    with pytest.raises(ValueError, match="TOPK"):
        DGQP(reg_max=4, topk=6)


def test_dgqp_output_by_hand():
    """hidden: unit 0 reads (l top-1) - (r mean), unit 1 reads -(b top-1) (ReLU'd to 0);
    out: 2 * unit0 - 5 * unit1 + 0.5."""
    dgqp = DGQP(reg_max=4, topk=4, channels=2, add_mean=True)
    assert dgqp.hidden.weight.shape == (2, 20, 1, 1) and dgqp.out.weight.shape == (1, 2, 1, 1)
    with torch.no_grad():
        dgqp.hidden.weight.zero_()
        dgqp.hidden.bias.zero_()
        dgqp.hidden.weight[0, 0] = 1.0  # l, top-1
        dgqp.hidden.weight[0, 14] = -1.0  # r, mean (edge 2 * 5 + 4)
        dgqp.hidden.weight[1, 15] = -1.0  # b, top-1
        dgqp.out.weight[0, :, 0, 0] = torch.tensor([2.0, -5.0])
        dgqp.out.bias.fill_(0.5)
    quality = dgqp(_box_logits())
    assert quality.shape == (1, 1, 2, 3)
    expected = 2.0 * (0.4 - 0.2375) + 0.5
    assert quality[0, 0, 1, 2].item() == pytest.approx(expected, abs=1e-6)
    assert quality[0, 0, 0, 0].item() == pytest.approx(2.0 * (0.2 - 0.2) + 0.5, abs=1e-6)


def _paper_qfl(s: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """-|y - s|^beta * ((1 - y) log(1 - s) + y log s), in float64."""
    s, y = s.double(), y.double()
    return -(y - s).abs() ** beta * ((1 - y) * torch.log(1 - s) + y * torch.log(s))


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_qfl_on_scores_matches_the_paper_formula(beta):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(500, generator=g) * 0.998 + 0.001
    y = torch.rand(500, generator=g)
    y[::3] = 0.0  # negatives
    ours = quality_focal_loss_on_scores(s, y, beta)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), _paper_qfl(s, y, beta), rtol=1e-5, atol=1e-7)
    # Through logs of the two factors of GFLv2's score: sigmoid(a) * sigmoid(b).
    a, b = torch.randn(500, generator=g) * 3, torch.randn(500, generator=g) * 3
    via_logs = quality_focal_loss_on_log_scores(F.logsigmoid(a) + F.logsigmoid(b), y, beta)
    expected = _paper_qfl(a.double().sigmoid() * b.double().sigmoid(), y, beta)
    torch.testing.assert_close(via_logs.double(), expected, rtol=1e-5, atol=1e-7)


def test_qfl_on_scores_equals_bce_at_zero_and_one_with_finite_gradients():
    s = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5], requires_grad=True)
    y = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.5])
    loss = quality_focal_loss_on_scores(s, y)
    reference = F.binary_cross_entropy(s.detach(), y, reduction="none") * (y - s.detach()).abs() ** 2
    torch.testing.assert_close(loss.detach(), reference)
    assert loss[1].item() == pytest.approx(100.0)  # y=1, s=0: log clamped at -100, as BCE
    loss.sum().backward()
    assert torch.isfinite(s.grad).all(), s.grad


def test_qfl_on_log_scores_finite_at_saturated_logits():
    """Scores of exactly 0 and 1 in float32 (logits of +-1e4 on both factors): finite loss and
    finite gradients on both the class and the quality logits."""
    cls = torch.tensor([1e4, 1e4, -1e4, -1e4, 1e4, 0.0], requires_grad=True)
    quality = torch.tensor([1e4, -1e4, 1e4, -1e4, 1e4, 0.0], requires_grad=True)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.3])
    loss = quality_focal_loss_on_log_scores(F.logsigmoid(cls) + F.logsigmoid(quality), y)
    assert torch.isfinite(loss).all(), loss
    assert loss[4].item() == 0.0 and loss[3].item() == 0.0  # perfect predictions
    assert loss[0].item() == pytest.approx(100.0)  # s == 1, y == 0: log(1 - s) clamped at -100
    loss.sum().backward()
    assert torch.isfinite(cls.grad).all() and torch.isfinite(quality.grad).all()


def test_qfl_on_scores_under_autocast_runs_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 3, generator=g).bfloat16()
    y = torch.rand(64, 3, generator=g)
    # (CUDA autocast refuses binary_cross_entropy on probabilities; CPU autocast lets it run in
    # bfloat16. Either way this loss must compute in float32.)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, log_scores = logits.sigmoid(), F.logsigmoid(logits)
        loss = quality_focal_loss_on_scores(scores, y)
        log_loss = quality_focal_loss_on_log_scores(log_scores, y)
    assert scores.dtype == log_scores.dtype == torch.bfloat16
    assert loss.dtype == log_loss.dtype == torch.float32
    # Equal to the formula evaluated in float64 on the same (bfloat16) inputs: no bf16 arithmetic.
    torch.testing.assert_close(loss.double(), _paper_qfl(scores.double(), y, 2.0), rtol=1e-5, atol=1e-7)
    expected = _paper_qfl(log_scores.double().exp(), y, 2.0)
    torch.testing.assert_close(log_loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_config_keys_and_errors():
    cfg = get_cfg()
    gfocal.add_gfl_config(cfg)
    assert cfg.MODEL.GFL.QUALITY == "joint"  # GFL (v1) stays the default
    assert (cfg.MODEL.GFL.DGQP.TOPK, cfg.MODEL.GFL.DGQP.CHANNELS, cfg.MODEL.GFL.DGQP.ADD_MEAN) == (
        4, 64, True,
    )
    bad = [
        ({"MODEL.GFL.DGQP.TOPK": 18}, r"MODEL\.GFL\.DGQP\.TOPK=18 .*REG_MAX \+ 1 = 17"),
        ({"MODEL.GFL.DGQP.TOPK": 0}, r"MODEL\.GFL\.DGQP\.TOPK=0"),
        ({"MODEL.GFL.DGQP.CHANNELS": 0}, r"MODEL\.GFL\.DGQP\.CHANNELS=0"),
        ({"MODEL.GFL.BOX_REPRESENTATION": "dirac"}, r"QUALITY='dgqp'.*BOX_REPRESENTATION"),
        ({"MODEL.GFL.CLS_LOSS": "FL"}, r"CLS_LOSS='FL' with MODEL\.GFL\.QUALITY='dgqp'"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            build_model(tiny_cfg(**DGQP_OPTS, **overrides))
    # GFL (v1) does not read the DGQP keys: a small REG_MAX with the default TOPK 4 still builds.
    check_gfl_config(tiny_cfg(**{"MODEL.GFL.REG_MAX": 2}))
    with pytest.raises(ValueError, match=r"MODEL\.GFL\.DGQP\.TOPK=4 .*= 3"):
        check_gfl_config(tiny_cfg(**DGQP_OPTS, **{"MODEL.GFL.REG_MAX": 2}))


def test_v1_model_has_no_dgqp_and_v2_adds_only_it():
    v1 = set(build_model(tiny_cfg()).state_dict())
    v2 = set(build_model(tiny_cfg(**DGQP_OPTS)).state_dict())
    assert not any("dgqp" in k for k in v1)
    assert v2 - v1 == {f"head.dgqp.{m}.{p}" for m in ("hidden", "out") for p in ("weight", "bias")}
    assert v1 - v2 == set()


def test_score_is_cls_times_quality_and_distribution_is_not_detached(toy_image):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**DGQP_OPTS))
    # Inference: the score of a detection is sigmoid(cls) x sigmoid(DGQP logit).
    model.eval()
    model.test_score_thresh = 0.0
    with torch.no_grad():
        features = [model.backbone(model.preprocess_image([toy_image]).tensor)[f] for f in model.head_in_features]
        logits, box_logits, quality = model.head(features)
        scores = torch.cat([(l.sigmoid() * q.sigmoid()).flatten() for l, q in zip(logits, quality)])
        detections = model([{"image": toy_image["image"]}])[0]["instances"]
    assert len(detections) > 0
    assert detections.scores.max().item() == pytest.approx(scores.max().item(), rel=1e-6)
    # Training: the classification loss reaches the box logits through the DGQP (in GFL v1 the
    # box branch gets no gradient from it: its IoU target is detached).
    model.train()
    for opts, reaches_box in ((DGQP_OPTS, True), ({}, False)):
        torch.manual_seed(0)
        m = build_model(tiny_cfg(**opts))
        with EventStorage():
            m([toy_image])["loss_cls"].backward()
        grad = m.head.box_pred.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches_box, opts


def test_training_learns_boxes_with_dgqp(toy_image):
    cfg = tiny_cfg(**DGQP_OPTS, **{"MODEL.BACKBONE.FREEZE_AT": 5})
    cfg.MODEL.GFL.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    before = _best_iou_per_gt(build_model(cfg), toy_image)
    model, history = _train(cfg, [toy_image], iterations=20)
    assert all(math.isfinite(h["total"]) for h in history)
    assert history[-1]["pos_iou"] > history[0]["pos_iou"] + 0.2
    after = _best_iou_per_gt(model, toy_image)
    assert after.mean() > before.mean() + 0.1, (before, after)


def test_training_step_under_bfloat16_autocast(toy_image):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**DGQP_OPTS))
    model.train()
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([toy_image])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.head.dgqp.hidden.weight.grad.abs().sum() > 0


def test_tree_crown_config_with_the_ablation_overrides_trains():
    """configs/trees/gfl_lite0_trees.yaml with the GFLv2 ablation row's overrides (random
    backbone weights here): SGD steps on a synthetic 400 px tile are finite and train the DGQP."""
    cfg = get_cfg()
    gfocal.add_gfl_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/trees/gfl_lite0_trees.yaml"))
    cfg.merge_from_list(["MODEL.GFL.QUALITY", "dgqp", "MODEL.EFFICIENTNET_LITE.WEIGHTS", ""])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.head.dgqp, DGQP)
    image = torch.full((3, 400, 400), 90.0)
    boxes = [[40, 50, 100, 120], [200, 210, 260, 250], [300, 20, 380, 90]]
    for x0, y0, x1, y1 in boxes:
        image[:, y0:y1, x0:x1] = 180.0
    sample = {"image": image, "instances": make_instances((400, 400), boxes, [0, 0, 0])}
    before = model.head.dgqp.out.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.SOLVER.BASE_LR)
    model.train()
    with EventStorage():
        for _ in range(2):
            losses = model([sample, sample])
            assert set(losses) == {"loss_cls", "loss_box", "loss_dfl"}
            assert all(torch.isfinite(v) for v in losses.values()), losses
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    assert not torch.equal(before, model.head.dgqp.out.weight)


# --- conversion of the official GFocalV2 checkpoint layout --------------------------------------


def gfocalv2_state_dict(make=torch.empty, topk: int = 4, add_mean: bool = True, channels: int = 64, **kw):
    """An official GFocalV2 checkpoint's keys: mmdetection v2 GFL plus bbox_head.reg_conf.0/.2."""
    sd = mmdet_gfl_state_dict(make=make, **kw)
    sd["bbox_head.reg_conf.0.weight"] = make(channels, 4 * (topk + int(add_mean)), 1, 1)
    sd["bbox_head.reg_conf.0.bias"] = make(channels)
    sd["bbox_head.reg_conf.2.weight"] = make(1, channels, 1, 1)
    sd["bbox_head.reg_conf.2.bias"] = make(1)
    return sd


def _cfg(config: str, opts=()):
    cfg = get_cfg()
    gfocal.add_gfl_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, config))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


GFLV2_ARCHS = {
    "R-50": ("configs/mmdet/gfocalv2_R_50_FPN_1x.yaml", dict(depth=50)),
    "R-101": ("configs/mmdet/gfocalv2_R_101_FPN_ms2x.yaml", dict(depth=101)),
    "R-101-dconv-c3-c5": (
        "configs/mmdet/gfocalv2_R_101_dconv_c3-c5_FPN_ms2x.yaml",
        dict(depth=101, dcn_stages=(2, 3, 4)),
    ),
    "X-101-32x4d-dconv-c4-c5": (
        "configs/mmdet/gfocalv2_X_101_32x4d_dconv_c4-c5_FPN_ms2x.yaml",
        dict(depth=101, groups=32, dcn_stages=(3, 4)),
    ),
}


@pytest.mark.parametrize("arch", sorted(GFLV2_ARCHS))
def test_official_gfocalv2_layout_converts_and_loads(arch):
    config, kwargs = GFLV2_ARCHS[arch]
    source = gfocalv2_state_dict(**kwargs)
    converted, info = convert_mmdet_gfl_state_dict(source, num_classes=80, reg_max=16)
    assert info.is_gflv2 and (info.dgqp_inputs, info.dgqp_channels) == (20, 64)
    assert len(converted) + len(info.dropped) == len(source)
    cfg = _cfg(config)
    check_dgqp_config(info, cfg)
    build_error = any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) and deform_conv_build_error(
        cfg.MODEL.RESNETS.DEFORM_MODULATED
    )
    if build_error:  # upstream detectron2 without its compiled ops: the documented clear error
        with pytest.raises(RuntimeError, match="MODEL.RESNETS.DEFORM_ON_PER_STAGE"), \
                torch.device("meta"):
            META_ARCH_REGISTRY.get("GFL")(cfg)
        pytest.skip(build_error + " (conversion and error checked)")
    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get("GFL")(cfg)
    check_against_model(converted, model.state_dict())
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_dgqp_weights_land_in_the_dgqp_and_reproduce_the_reference_quality():
    torch.manual_seed(0)
    source = gfocalv2_state_dict(make=torch.randn, depth=18, fpn_channels=64, stacked_convs=1)
    converted, _ = convert_mmdet_gfl_state_dict(source)
    model = build_model(tiny_cfg(**DGQP_OPTS, **{
        "MODEL.RESNETS.STRIDE_IN_1X1": False, "MODEL.RESNETS.NORM": "FrozenBN",
        "MODEL.GFL.NUM_CONVS": 1, "MODEL.GFL.NUM_CLASSES": 80, "MODEL.FPN.SIZE_DIVISIBILITY": 32,
    }))
    model.load_state_dict(converted, strict=True)
    for key, tensor in {
        "bbox_head.reg_conf.0.weight": model.head.dgqp.hidden.weight,
        "bbox_head.reg_conf.0.bias": model.head.dgqp.hidden.bias,
        "bbox_head.reg_conf.2.weight": model.head.dgqp.out.weight,
        "bbox_head.reg_conf.2.bias": model.head.dgqp.out.bias,
    }.items():
        assert torch.equal(source[key], tensor.detach()), key
    # The reference's quality: reg_conf (conv, ReLU, conv, Sigmoid) on the stacked top-4 + mean.
    reference = nn.Sequential(nn.Conv2d(20, 64, 1), nn.ReLU(), nn.Conv2d(64, 1, 1), nn.Sigmoid())
    reference.load_state_dict({k[len("bbox_head.reg_conf."):]: v for k, v in source.items()
                               if k.startswith("bbox_head.reg_conf.")})
    logits = torch.randn(2, 68, 5, 6) * 3
    prob = F.softmax(logits.reshape(2, 4, 17, 5, 6), dim=2)
    top = prob.topk(4, dim=2).values
    stat = torch.cat([top, top.mean(dim=2, keepdim=True)], dim=2).reshape(2, -1, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(model.head.dgqp(logits).sigmoid(), reference(stat))


def test_conversion_refuses_v1_v2_mix_ups_and_unmapped_keys(tmp_path):
    v2 = gfocalv2_state_dict()
    v1_cfg = _cfg("configs/mmdet/gfl_R_50_FPN_1x.yaml")
    v2_cfg = _cfg("configs/mmdet/gfocalv2_R_50_FPN_1x.yaml")
    _, info = convert_mmdet_gfl_state_dict(v2)
    with pytest.raises(ConversionError, match=r"GFocalV2 model .*MODEL\.GFL\.QUALITY='joint'"):
        check_dgqp_config(info, v1_cfg)
    _, v1_info = convert_mmdet_gfl_state_dict(mmdet_gfl_state_dict())
    with pytest.raises(ConversionError, match=r"QUALITY='dgqp' but the checkpoint has no DGQP"):
        check_dgqp_config(v1_info, v2_cfg)
    _, info8 = convert_mmdet_gfl_state_dict(gfocalv2_state_dict(topk=8))
    with pytest.raises(ConversionError, match=r"36 statistics.*MODEL\.GFL\.DGQP\.TOPK=4"):
        check_dgqp_config(info8, v2_cfg)
    extra = dict(v2, **{"bbox_head.reg_conf.4.weight": torch.empty(1)})
    with pytest.raises(ConversionError, match=r"bbox_head\.reg_conf\.4\.weight"):
        convert_mmdet_gfl_state_dict(extra)
    # The whole file path: a v2 file with a v1 config is refused before anything is written.
    src, dst = tmp_path / "v2.pth", tmp_path / "out.pth"
    torch.save({"state_dict": v2}, src)
    with pytest.raises(ConversionError, match="GFocalV2"):
        convert_mmdet_gfl_checkpoint(str(src), str(dst), v1_cfg)
    assert not dst.exists()


def test_zoo_entries_and_manual_download_advice(tmp_path):
    assert len(model_zoo.GFLV2_MODELS) == 5
    published = {"gfocalv2_R_50_FPN_1x": 41.0, "gfocalv2_R_50_FPN_ms2x": 43.9,
                 "gfocalv2_R_101_FPN_ms2x": 45.8, "gfocalv2_R_101_dconv_c3-c5_FPN_ms2x": 48.0,
                 "gfocalv2_X_101_32x4d_dconv_c4-c5_FPN_ms2x": 48.8}
    for name, ap in published.items():
        entry = model_zoo.GFLV2_MODELS[f"mmdet/{name}"]
        assert entry.ap == ap and entry.manual_download
        assert entry.url.startswith("https://drive.google.com/file/d/")
        cfg = model_zoo.get_config(name, trained=False)
        assert cfg.MODEL.GFL.QUALITY == "dgqp", name
    assert set(model_zoo.list_models()) >= {f"mmdet/{n}" for n in published}
    entry = model_zoo.GFLV2_MODELS["mmdet/gfocalv2_R_50_FPN_1x"]
    with pytest.raises(FileNotFoundError) as info:
        model_zoo.get_checkpoint("gfocalv2_R_50_FPN_1x", cache_dir=str(tmp_path))
    assert entry.url in str(info.value)
    assert os.path.join(str(tmp_path), "gfocalv2", "GFocal_R_50_FPN_1x.pth") in str(info.value)


# --- export ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dgqp_model():
    torch.manual_seed(0)
    m = build_model(tiny_cfg(**DGQP_OPTS)).eval()
    with torch.no_grad():
        nn.init.normal_(m.head.cls_score.weight, std=0.02)
        nn.init.constant_(m.head.cls_score.bias, -1.0)
        nn.init.normal_(m.head.box_pred.weight, std=0.05)
        nn.init.normal_(m.head.dgqp.out.weight, std=1.0)
        nn.init.constant_(m.head.dgqp.out.bias, 1.0)
    return m


def _check(diff, tol):
    assert diff["count"] > 10, "too few detections for a meaningful comparison"
    assert diff["boxes"] <= tol["boxes"] and diff["scores"] <= tol["scores"], diff


def test_torchscript_with_dgqp_matches_eager(dgqp_model, tmp_path):
    traced_on, other = _image(128, 160, 0), _image(160, 224, 1)
    path = str(tmp_path / "gflv2.ts")
    export_torchscript(dgqp_model, traced_on, path)
    loaded = torch.jit.load(path)
    with torch.no_grad():
        for image in (traced_on, other):
            _check(compare_detections(_eager(dgqp_model, image), loaded(image)), TS_TOL)


def test_onnx_with_dgqp_matches_eager(dgqp_model, tmp_path):
    traced_on, other = _image(128, 160, 0), _image(160, 224, 1)
    path = str(tmp_path / "gflv2.onnx")
    export_onnx(dgqp_model, traced_on, path)
    graph = onnx.load(path).graph
    ops = _op_types(graph)
    assert "TopK" in ops and "NonMaxSuppression" in ops, ops
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for image in (traced_on, other):
        _check(
            compare_detections(_eager(dgqp_model, image), session.run(None, {"image": image.numpy()})),
            ONNX_TOL,
        )


def test_top4_of_17_bins_exports_to_onnx(tmp_path):
    """The DGQP alone (top-4 over 17 bins per edge): ONNX TopK, same values as PyTorch."""
    torch.manual_seed(0)
    dgqp = DGQP(reg_max=16).eval()
    nn.init.normal_(dgqp.hidden.weight, std=0.5)
    logits = torch.randn(1, 68, 6, 7) * 4
    path = str(tmp_path / "dgqp.onnx")
    torch.onnx.export(dgqp, (logits,), path, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {2: "h", 3: "w"}})
    topk = [n for n in onnx.load(path).graph.node if n.op_type == "TopK"]
    assert len(topk) == 1
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for x in (logits, torch.randn(1, 68, 3, 9) * 4):
        torch.testing.assert_close(
            torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), dgqp(x).detach(),
            rtol=1e-5, atol=1e-6,
        )
