"""The GFL model end to end on tiny inputs: every config builds and runs, training learns,
inference returns detectron2's standard output."""
import glob
import os

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from conftest import CONFIG_DIR, make_instances, tiny_cfg
from gfocal import add_gfl_config
from gfocal.utils import deform_conv_build_error, deform_conv_run_error

ALL_CONFIGS = sorted(
    os.path.relpath(p, CONFIG_DIR)
    for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)

VARIANTS = {
    "gfl": {},
    "qfl_only": {"MODEL.GFL.BOX_REPRESENTATION": "dirac", "MODEL.GFL.USE_DFL": False},
    "dfl_only": {"MODEL.GFL.CLS_LOSS": "FL", "MODEL.GFL.QUALITY": "centerness"},
    "atss": {
        "MODEL.GFL.CLS_LOSS": "FL",
        "MODEL.GFL.QUALITY": "centerness",
        "MODEL.GFL.BOX_REPRESENTATION": "dirac",
    },
    "iou_branch": {"MODEL.GFL.CLS_LOSS": "FL", "MODEL.GFL.QUALITY": "iou"},
    "gflv2_dgqp": {"MODEL.GFL.QUALITY": "dgqp"},
    "no_quality_no_dfl": {
        "MODEL.GFL.CLS_LOSS": "FL",
        "MODEL.GFL.QUALITY": "none",
        "MODEL.GFL.USE_DFL": False,
    },
}


def _config_for_smoke_test(name: str):
    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, name))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    if cfg.MODEL.BACKBONE.NAME == "build_gfl_resnet_fpn_backbone":
        # Keep it fast: ResNet-18 where the config's blocks allow it (no groups, no DCN).
        if cfg.MODEL.RESNETS.NUM_GROUPS == 1 and not any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
            cfg.MODEL.RESNETS.DEPTH = 18
            cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        else:
            cfg.MODEL.RESNETS.DEPTH = 50
    return cfg


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_builds_and_runs(name, toy_image):
    cfg = _config_for_smoke_test(name)
    uses_dcn = cfg.MODEL.BACKBONE.NAME == "build_gfl_resnet_fpn_backbone" and any(
        cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE
    )
    build_error = uses_dcn and deform_conv_build_error(cfg.MODEL.RESNETS.DEFORM_MODULATED)
    if build_error:
        with pytest.raises(RuntimeError, match="MODEL.RESNETS.DEFORM_ON_PER_STAGE"):
            build_model(cfg)  # a clear error, not the dummy layer's
        pytest.skip(build_error + " (error checked)")
    model = build_model(cfg)
    if uses_dcn:
        reason = deform_conv_run_error(cfg.MODEL.RESNETS.DEFORM_MODULATED)
        if reason:
            pytest.skip(reason + " (built, not run)")
    inputs = dict(toy_image)
    inputs["instances"] = make_instances((128, 160), [[10, 20, 60, 70]], [0])
    model.train()
    with EventStorage():
        losses = model([inputs])
    assert losses and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model([{"image": toy_image["image"], "height": 128, "width": 160}])
    assert isinstance(out[0]["instances"], Instances)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_losses(variant, toy_image):
    cfg = tiny_cfg(**VARIANTS[variant])
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model([toy_image])
    expected = {"loss_cls", "loss_box"}
    if cfg.MODEL.GFL.BOX_REPRESENTATION == "distribution" and cfg.MODEL.GFL.USE_DFL:
        expected.add("loss_dfl")
    if cfg.MODEL.GFL.QUALITY in ("centerness", "iou"):
        expected.add("loss_quality")
    assert set(losses) == expected
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _train(cfg, batch, iterations, lr=0.01):
    """SGD on a fixed batch. Callers freeze the ResNet (``FREEZE_AT 5``): the FPN and the head
    are what these tests are about, and the ResNet's backward would dominate the CPU time."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history = []
    with EventStorage() as storage:
        for _ in range(iterations):
            losses = model(batch)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            history.append(
                {"total": total.item(), "pos_iou": storage.history("pos_iou").latest()}
            )
    return model, history


def _best_iou_per_gt(model, sample) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        result = model([{"image": sample["image"], "height": 128, "width": 160}])[0]["instances"]
    model.train()
    if len(result) == 0:
        return torch.zeros(len(sample["instances"]))
    return pairwise_iou(sample["instances"].gt_boxes, result.pred_boxes).max(dim=1).values


def test_training_learns_boxes(toy_image):
    """GFL's total loss is not monotone (QFL targets are the IoUs of the improving boxes and the
    box losses are weighted by the rising scores), so this checks what it learns: the positives'
    predicted boxes fit their GTs better, and the detections cover the objects better."""
    cfg = tiny_cfg(**{"MODEL.BACKBONE.FREEZE_AT": 5})
    cfg.MODEL.GFL.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    before = _best_iou_per_gt(build_model(cfg), toy_image)  # same seed as _train's model
    model, history = _train(cfg, [toy_image], iterations=20)
    assert history[0]["pos_iou"] < 0.5
    assert history[-1]["pos_iou"] > history[0]["pos_iou"] + 0.2
    after = _best_iou_per_gt(model, toy_image)
    assert after.mean() > before.mean() + 0.1, (before, after)
    assert after.max() > 0.5, after


def test_training_lowers_loss_of_the_atss_baseline(toy_image):
    cfg = tiny_cfg(**VARIANTS["atss"], **{"MODEL.BACKBONE.FREEZE_AT": 5})
    _, history = _train(cfg, [toy_image], iterations=12)
    first = sum(h["total"] for h in history[:3]) / 3
    last = sum(h["total"] for h in history[-3:]) / 3
    assert last < 0.8 * first, (first, last)


def test_image_without_annotations_trains(toy_image):
    cfg = tiny_cfg()
    model = build_model(cfg)
    model.train()
    empty = {"image": toy_image["image"], "instances": make_instances((128, 160), [], [])}
    with EventStorage():
        losses = model([empty, toy_image])
        total = sum(losses.values())
        total.backward()
        assert torch.isfinite(total)
        losses = model([empty])
        total = sum(losses.values())
        total.backward()
    assert torch.isfinite(total) and losses["loss_box"].item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_inference_output_in_original_image_size(toy_image):
    cfg = tiny_cfg()
    cfg.MODEL.GFL.SCORE_THRESH_TEST = 0.0  # keep candidates from a random model
    cfg.TEST.DETECTIONS_PER_IMAGE = 7
    model = build_model(cfg)
    model.eval()
    with torch.no_grad():
        outputs = model(
            [
                {"image": toy_image["image"], "height": 256, "width": 320},
                {"image": toy_image["image"][:, :96, :128]},
            ]
        )
    first, second = outputs[0]["instances"], outputs[1]["instances"]
    assert first.image_size == (256, 320) and second.image_size == (96, 128)
    assert len(first) == 7
    for inst, (h, w) in ((first, (256, 320)), (second, (96, 128))):
        boxes = inst.pred_boxes.tensor
        assert boxes.shape[1] == 4
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert inst.scores.shape == (len(inst),) and inst.pred_classes.dtype == torch.int64
        assert (inst.pred_classes >= 0).all() and (inst.pred_classes < 3).all()
        assert torch.all(inst.scores[:-1] >= inst.scores[1:])
    # Rescaled to 2x the input size: boxes of the first image lie in 256 x 320.
    assert first.pred_boxes.tensor[:, 2].max() > 160 or first.pred_boxes.tensor[:, 3].max() > 128
