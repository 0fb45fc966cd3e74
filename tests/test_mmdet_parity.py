"""Parity with mmdetection's own GFL: build mmdet 3.x's R-50 GFL with random (perturbed) weights,
convert its state dict with gfocal.model_io.conversion, run both on the same image and compare the
per-level classification and distribution logits and the final detections.

Needs mmdet (tools/setup_mmdet_env.sh creates .venv-mmdet with it; run this file with
.venv-mmdet/bin/python -m pytest -q tests/test_mmdet_parity.py). mmcv-lite has no compiled ops;
the only one GFL inference calls, NMS, is supplied from torchvision for this test.
"""
import importlib.util
import os
import sys
import types

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORE_TOL = 1e-4  # max |score difference| allowed (issue 4's target)
BOX_TOL = 1e-3  # max |box coordinate difference| in pixels, "the same boxes"

if importlib.util.find_spec("mmdet") is None or importlib.util.find_spec("mmengine") is None:
    pytest.skip(
        "mmdet/mmengine are not importable in this environment; run this test with the "
        "environment from tools/setup_mmdet_env.sh (.venv-mmdet/bin/python -m pytest "
        "tests/test_mmdet_parity.py)",
        allow_module_level=True,
    )


def _install_nms_for_mmcv_lite() -> None:
    """mmcv-lite lacks ``mmcv._ext``; give it a module whose ``nms`` is torchvision's (same IoU
    without the +1 offset) and whose other ops raise."""
    try:
        import mmcv._ext  # noqa: F401  (full mmcv: keep its ops)
        return
    except ImportError:
        pass
    import torchvision

    ext = types.ModuleType("mmcv._ext")

    def nms(boxes, scores, iou_threshold, offset=0):
        if offset != 0:
            raise NotImplementedError("the test's NMS supports offset=0 only")
        return torchvision.ops.nms(boxes, scores, iou_threshold)

    def missing(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise NotImplementedError(f"mmcv op {name} is not available in mmcv-lite")

        return op

    ext.nms = nms
    ext.__getattr__ = missing
    sys.modules["mmcv._ext"] = ext


def _build_mmdet_gfl():
    _install_nms_for_mmcv_lite()
    import mmdet
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    config = os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs/gfl/gfl_r50_fpn_1x_coco.py")
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None  # no ImageNet download
    # mmdet's init_weights() is not called: _perturb() sets every tensor the test relies on.
    return MODELS.build(cfg.model).eval()


@torch.no_grad()
def _perturb(model, generator: torch.Generator) -> None:
    """Random weights that make every part matter: mmdet's init zeroes each residual block's last
    norm (a near-identity backbone) and gives scores below the 0.05 threshold."""

    def rand(t, low, high):
        return torch.rand(t.shape, generator=generator) * (high - low) + low

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.copy_(rand(module.weight, 0.3, 1.0))
            module.bias.copy_(rand(module.bias, -0.2, 0.2))
            module.running_mean.copy_(rand(module.running_mean, -0.2, 0.2))
            module.running_var.copy_(rand(module.running_var, 0.5, 1.5))
        elif isinstance(module, torch.nn.GroupNorm):
            module.weight.copy_(rand(module.weight, 0.5, 1.5))
            module.bias.copy_(rand(module.bias, -0.3, 0.3))
    head = model.bbox_head
    head.gfl_cls.weight.copy_(torch.randn(head.gfl_cls.weight.shape, generator=generator) * 0.03)
    head.gfl_cls.bias.copy_(rand(head.gfl_cls.bias, -3.5, -1.5))
    head.gfl_reg.weight.copy_(torch.randn(head.gfl_reg.weight.shape, generator=generator) * 0.05)
    head.gfl_reg.bias.copy_(torch.randn(head.gfl_reg.bias.shape, generator=generator))
    for scale in head.scales:
        scale.scale.copy_(rand(scale.scale, 0.8, 1.2))
    for conv in list(model.neck.lateral_convs) + list(model.neck.fpn_convs):
        conv.conv.bias.copy_(rand(conv.conv.bias, -0.1, 0.1))


def _build_gfocal(state_dict):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import gfocal
    from gfocal.model_io.conversion import check_against_model, convert_mmdet_gfl_state_dict

    cfg = get_cfg()
    gfocal.add_gfl_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs/mmdet/gfl_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    converted, _ = convert_mmdet_gfl_state_dict(
        state_dict, num_classes=cfg.MODEL.GFL.NUM_CLASSES, reg_max=cfg.MODEL.GFL.REG_MAX
    )
    check_against_model(converted, model.state_dict())
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


@pytest.fixture(scope="module")
def outputs():
    from mmdet.structures import DetDataSample

    generator = torch.Generator().manual_seed(0)
    mm_model = _build_mmdet_gfl()
    _perturb(mm_model, generator)
    d2_model = _build_gfocal(mm_model.state_dict())

    # A smooth random RGB image whose size is not a multiple of 32 (exercises padding, clipping).
    height, width = 290, 430
    coarse = torch.rand((1, 3, 12, 18), generator=generator) * 255
    rgb = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0]
    rgb = rgb.round().clamp(0, 255).to(torch.uint8)

    with torch.no_grad():
        # mmdetection: its data preprocessor gets BGR (bgr_to_rgb=True), as from cv2.imread.
        sample = DetDataSample(
            metainfo=dict(img_shape=(height, width), ori_shape=(height, width), scale_factor=(1.0, 1.0))
        )
        data = mm_model.data_preprocessor(
            {"inputs": [rgb.flip(0)], "data_samples": [sample]}, training=False
        )
        feats = mm_model.extract_feat(data["inputs"])
        mm_cls, mm_reg = mm_model.bbox_head(feats)
        mm_det = mm_model.bbox_head.predict_by_feat(
            mm_cls, mm_reg, batch_img_metas=[s.metainfo for s in data["data_samples"]], rescale=False
        )[0]

        # detectron2: INPUT.FORMAT RGB.
        inputs = [{"image": rgb.float(), "height": height, "width": width}]
        images = d2_model.preprocess_image(inputs)
        features = d2_model.backbone(images.tensor)
        d2_cls, d2_reg, _ = d2_model.head([features[f] for f in d2_model.head_in_features])
        d2_det = d2_model(inputs)[0]["instances"]
    return dict(
        mm_input=data["inputs"], d2_input=images.tensor, mm_cls=mm_cls, mm_reg=mm_reg,
        d2_cls=d2_cls, d2_reg=d2_reg, mm_det=mm_det, d2_det=d2_det,
    )


def test_same_normalised_input(outputs):
    assert outputs["mm_input"].shape == outputs["d2_input"].shape == (1, 3, 320, 448)
    assert torch.equal(outputs["mm_input"], outputs["d2_input"])


def test_per_level_logits(outputs):
    assert len(outputs["mm_cls"]) == len(outputs["d2_cls"]) == 5
    for level, (a, b, c, d) in enumerate(
        zip(outputs["mm_cls"], outputs["d2_cls"], outputs["mm_reg"], outputs["d2_reg"])
    ):
        assert a.shape == b.shape and c.shape == d.shape, level
        cls_diff = (a - b).abs().max().item()
        reg_diff = (c - d).abs().max().item()
        print(f"level {level} {tuple(a.shape[2:])}: max |cls logit diff| {cls_diff:.3g}, "
              f"max |distribution logit diff| {reg_diff:.3g}")
        assert cls_diff <= 1e-4 and reg_diff <= 1e-4, level


def _match_detections(mm, d2) -> list:
    """For each mmdet detection, the index of the gfocal detection with the same label and score
    (within SCORE_TOL) and the nearest box, each used once. Order-independent: detections of equal
    score may leave the sort in either order, and which one a CPU's sort puts first varies."""
    cost = (mm.bboxes[:, None, :] - d2.pred_boxes.tensor[None]).abs().amax(dim=-1)
    other = (mm.labels[:, None] != d2.pred_classes[None]) | (
        (mm.scores[:, None] - d2.scores[None]).abs() > SCORE_TOL
    )
    cost[other] = float("inf")
    matched = []
    for row in cost:
        row = row.clone()
        row[matched] = float("inf")
        matched.append(int(row.argmin()))
    return matched


def test_final_detections(outputs):
    mm, d2 = outputs["mm_det"], outputs["d2_det"]
    n = len(mm.scores)
    print(f"detections: mmdet {n}, gfocal {len(d2)}")
    assert n >= 20, "the perturbed weights should give a meaningful number of detections"
    assert len(d2) == n
    score_diff = (mm.scores - d2.scores).abs().max().item()
    print(f"max |score diff| {score_diff:.3g} (both sorted by score)")
    assert score_diff <= SCORE_TOL
    matched = _match_detections(mm, d2)
    boxes = d2.pred_boxes.tensor[matched]
    per_detection = (mm.bboxes - boxes).abs().amax(dim=-1)
    box_diff = per_detection.max().item()
    reordered = sum(i != j for i, j in enumerate(matched))
    print(f"max |box diff| {box_diff:.3g} px ({reordered} detections of equal score in another order)")
    for i in torch.nonzero(per_detection > BOX_TOL).flatten().tolist():
        print(f"  mmdet #{i}: score {mm.scores[i].item():.9g} label {mm.labels[i].item()} "
              f"box {mm.bboxes[i].tolist()}; nearest gfocal #{matched[i]}: box {boxes[i].tolist()}")
    assert box_diff <= BOX_TOL
    assert torch.equal(mm.labels, d2.pred_classes[matched])
