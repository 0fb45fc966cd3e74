"""The loss variants (gfocal/modeling/loss_variants.py): each one's targets and weights by hand,
bad names and values refused when a LazyConfig is instantiated (not only by the YAML check), and
the model and data packages importing in one direction only."""
import ast
import glob
import os

import pytest
import torch
from fvcore.nn import sigmoid_focal_loss

from detectron2.config import LazyConfig, instantiate

from conftest import CONFIG_DIR, REPO_ROOT
from gfocal.config import CLS_LOSSES, QFL_QUALITIES, QUALITY_BRANCHES
from gfocal.modeling.loss_variants import QUALITY_VARIANTS, GFLLossConfig, Positives
from gfocal.modeling.losses import centerness_targets, quality_focal_loss


def test_variants_are_the_config_values():
    assert tuple(QUALITY_VARIANTS) == QUALITY_BRANCHES
    assert tuple(n for n, v in QUALITY_VARIANTS.items() if v.cls_loss == "QFL") == QFL_QUALITIES
    assert {v.cls_loss for v in QUALITY_VARIANTS.values()} == set(CLS_LOSSES)


def _toy():
    """Two images, 3 anchors, 2 classes; positives at (0, 1) class 1 and (1, 2) class 0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 2, generator=g)
    quality = torch.randn(2, 3, generator=g)
    pos = Positives(
        img=torch.tensor([0, 1]),
        anchor=torch.tensor([1, 2]),
        classes=torch.tensor([1, 0]),
        ious=torch.tensor([0.8, 0.3]),
        distances=torch.tensor([[1.0, 2.0, 3.0, 2.0], [2.0, 2.0, 2.0, 2.0]]),
    )
    return logits, quality, pos


def _config(quality):
    cls_loss = "QFL" if quality in QFL_QUALITIES else "FL"
    return GFLLossConfig(quality=quality, cls_loss=cls_loss, focal_loss_alpha=0.25, focal_loss_gamma=2.0)


def test_joint_quality_by_hand():
    logits, _, pos = _toy()
    variant = _config("joint").variant
    loss, scores = variant.classification_loss(logits, None, pos)
    targets = torch.zeros(2, 3, 2)
    targets[0, 1, 1], targets[1, 2, 0] = 0.8, 0.3  # the IoU at the GT class
    assert torch.equal(loss, quality_focal_loss(logits, targets, 2.0).sum())
    expected = torch.stack([logits[0, 1].sigmoid().max(), logits[1, 2].sigmoid().max()])
    assert torch.equal(scores, expected) and torch.equal(variant.box_weights(pos, scores), expected)
    assert variant.quality_target(pos) is None and variant.head_quality is None


def test_dgqp_quality_by_hand():
    logits, quality, pos = _toy()
    variant = _config("dgqp").variant
    loss, scores = variant.classification_loss(logits, quality, pos)
    score = logits.sigmoid() * quality.sigmoid()[..., None]  # GFLv2: cls x quality
    targets = torch.zeros(2, 3, 2)
    targets[0, 1, 1], targets[1, 2, 0] = 0.8, 0.3
    paper = -(targets - score).abs() ** 2 * (targets * score.log() + (1 - targets) * (1 - score).log())
    torch.testing.assert_close(loss, paper.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, torch.stack([score[0, 1].max(), score[1, 2].max()]))
    assert variant.head_quality == "dgqp" and variant.quality_target(pos) is None


@pytest.mark.parametrize("name", ["centerness", "iou", "none"])
def test_focal_loss_variants_by_hand(name):
    logits, quality, pos = _toy()
    variant = _config(name).variant
    loss, scores = variant.classification_loss(logits, quality, pos)
    onehot = torch.zeros(2, 3, 2)
    onehot[0, 1, 1] = onehot[1, 2, 0] = 1.0
    assert scores is None
    assert torch.equal(loss, sigmoid_focal_loss(logits, onehot, 0.25, 2.0, reduction="sum"))
    centerness = centerness_targets(pos.distances)
    # (1, 2, 3, 2): sqrt(1/3 * 1) ; (2, 2, 2, 2): 1
    torch.testing.assert_close(centerness, torch.tensor([(1 / 3) ** 0.5, 1.0]))
    weights = {"centerness": centerness, "iou": torch.ones(2), "none": torch.ones(2)}[name]
    target = {"centerness": centerness, "iou": pos.ious, "none": None}[name]
    assert torch.equal(variant.box_weights(pos, scores), weights)
    got = variant.quality_target(pos)
    assert (got is None) if target is None else torch.equal(got, target)
    assert variant.head_quality == (None if name == "none" else "branch")


BAD_LOSS_ARGS = [
    ({"quality": "iou-aware"}, r"quality='iou-aware' \(MODEL\.GFL\.QUALITY\) is not one of "
     r"\['joint', 'centerness', 'iou', 'none', 'dgqp'\]"),
    ({"cls_loss": "GFL"}, r"cls_loss='GFL' \(MODEL\.GFL\.CLS_LOSS\) is not one of \['QFL', 'FL'\]"),
    ({"cls_loss": "FL"}, r"cls_loss='FL' with quality='joint'"),
    ({"quality": "none"}, r"cls_loss='QFL' with quality='none'"),
    ({"use_dfl": "yes"}, r"use_dfl='yes' \(MODEL\.GFL\.USE_DFL\) must be True or False"),
    ({"qfl_beta": 0.5}, r"qfl_beta=0\.5 \(MODEL\.GFL\.QFL_BETA\) must be 0 or a finite number >= 1"),
    ({"focal_loss_gamma": -1.0}, r"focal_loss_gamma=-1\.0 \(MODEL\.GFL\.FOCAL_LOSS_GAMMA\)"),
    ({"focal_loss_alpha": 1.5}, r"focal_loss_alpha=1\.5 \(MODEL\.GFL\.FOCAL_LOSS_ALPHA\) must be in \[0, 1\]"),
    ({"weights": {"loss_bbox": 2.0}}, r"unknown losses \['loss_bbox'\]"),
    ({"weights": {"loss_dfl": float("nan")}}, r"MODEL\.GFL\.LOSS_DFL_WEIGHT\) must be a finite number >= 0"),
]


@pytest.mark.parametrize("overrides,message", BAD_LOSS_ARGS)
def test_bad_loss_arguments_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        GFLLossConfig(**overrides)


def _instantiate(overrides):
    """The tree-crown LazyConfig's model (a small backbone: cheap to build) with ``overrides``."""
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "trees", "gfl_lite0_trees.py"))
    cfg = LazyConfig.apply_overrides(cfg, overrides)
    cfg.model.backbone.bottom_up.weights = ""  # random init: only the checks matter here
    cfg.model.backbone.bottom_up.feature_cache_mb = 0
    return instantiate(cfg.model)


LAZY_BAD = [
    (["model.loss.quality=iou-aware"], r"quality='iou-aware' \(MODEL\.GFL\.QUALITY\) is not one of"),
    (["model.loss.cls_loss=GFL"], r"cls_loss='GFL' \(MODEL\.GFL\.CLS_LOSS\)"),
    (["model.loss.quality=centerness"], r"cls_loss='QFL' with quality='centerness'"),
    (["model.loss.qfl_beta=0.5"], r"qfl_beta=0\.5 \(MODEL\.GFL\.QFL_BETA\)"),
    (["model.box_representation=gaussian"],
     r"box_representation='gaussian' \(MODEL\.GFL\.BOX_REPRESENTATION\) is not one of \['distribution', 'dirac'\]"),
    # The head's arguments are set apart from the model's in a LazyConfig: they must agree.
    (["model.loss.quality=centerness", "model.loss.cls_loss=FL"],
     r"quality='centerness' \(MODEL\.GFL\.QUALITY\) needs a head with a quality branch"),
    (["model.loss.quality=dgqp"], r"quality='dgqp' \(MODEL\.GFL\.QUALITY\) needs a head with a DGQP"),
    (["model.head.with_quality_branch=True"], r"quality='joint' .*this head has a quality branch"),
    (["model.reg_max=8"], r"box_dim=68.*reg_max=8 \(MODEL\.GFL\.REG_MAX\) needs box_dim 36"),
    (["model.box_representation=dirac"], r"box_representation='dirac'.*needs box_dim 4"),
]


@pytest.mark.parametrize("overrides,message", LAZY_BAD)
def test_lazy_config_with_a_bad_variant_is_refused_at_instantiate(overrides, message):
    with pytest.raises(ValueError, match=message):
        _instantiate(overrides)


def test_lazy_config_ablations_instantiate():
    """The sensitivity check of the above: consistent overrides of the same kind build."""
    atss = ["model.loss.quality=centerness", "model.loss.cls_loss=FL", "model.loss.use_dfl=False",
            "model.box_representation=dirac", "model.head.box_dim=4", "model.head.with_quality_branch=True"]
    model = _instantiate(atss)
    assert model.loss.variant.name == "centerness" and not model.use_dfl
    model = _instantiate(["model.reg_max=8", "model.head.box_dim=36"])
    assert model.reg_max == 8 and model.loss.variant.name == "joint"


def _imports(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_modeling_does_not_import_data():
    """gfocal.data uses the model's anchors and assignment; the model never imports the data."""
    folder = os.path.join(REPO_ROOT, "projects", "GFocal", "gfocal", "modeling")
    files = glob.glob(os.path.join(folder, "**", "*.py"), recursive=True)
    assert len(files) > 10
    for path in files:
        for name in _imports(path):
            assert not (name.startswith("..data") or name.startswith("gfocal.data")), (path, name)
    analysis = os.path.join(folder, "..", "data", "analysis.py")
    assert "..modeling.anchors" in set(_imports(analysis))  # the direction that exists
