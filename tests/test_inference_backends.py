"""Backends of the tiled predictor (gfocal/inference/backends.py): ONNX Runtime and OpenVINO,
running the tree model's backbone and head, reproduce eager PyTorch's detections in fp32 (>= 99%
of the boxes matched at IoU 0.9, both ways), with distribution voting and with OpenVINO's bf16,
leave the model as it was, and bad choices get errors naming the flag."""
import sys

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_cfg

from gfocal.inference import TiledPredictor
from gfocal.inference.agreement import box_agreement


@pytest.fixture(scope="module")
def eager():
    """The tree model (EfficientNet-Lite0 with its packaged ImageNet weights, P3-P5 head) with
    head weights spread so that scores differ, without voting (not part of the export)."""
    torch.manual_seed(0)
    cfg = tiny_cfg("trees/gfl_lite0_trees.yaml", **{
        "MODEL_EMA.ENABLED": False, "MODEL.GFL.BOX_VOTING.ENABLED": False})
    predictor = TiledPredictor(cfg, patch_size=256, overlap=64)
    with torch.no_grad():
        nn.init.normal_(predictor.model.head.cls_score.weight, std=0.05)
        nn.init.constant_(predictor.model.head.cls_score.bias, -1.0)
        nn.init.normal_(predictor.model.head.box_pred.weight, std=0.05)
    return predictor


@pytest.fixture(scope="module")
def image():
    noise = np.random.default_rng(0).integers(0, 255, (400, 480, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (9, 9), 3)  # blobs: a spread of scores and box sizes


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_backends_reproduce_eager(eager, image, backend):
    ours = TiledPredictor(model=eager.model, input_format="RGB", patch_size=256, overlap=64,
                          backend=backend)
    want = eager(image).instances
    got = ours(image).instances
    assert len(want) > 50
    assert box_agreement(want.pred_boxes.tensor, got.pred_boxes.tensor, iou=0.9) >= 0.99
    assert box_agreement(got.pred_boxes.tensor, want.pred_boxes.tensor, iou=0.9) >= 0.99
    assert abs(len(got) - len(want)) <= 0.01 * len(want)
    # the per-tile cap and score threshold of the predictor are in the exported graph too
    strict = TiledPredictor(model=eager.model, input_format="RGB", patch_size=256, overlap=64,
                            backend=backend, score_thresh=0.7, tile_max_dets=5)
    (tile,) = strict.predict_tiles([image[:256, :256]])
    assert 0 < len(tile) <= 5 and (tile.scores > 0.7).all()
    # a tile of another size (an image smaller than the patch) gets its own export
    small = ours.predict_tiles([image[:200, :224]])[0]
    ref = eager.predict_tiles([image[:200, :224]])[0]
    assert box_agreement(ref.pred_boxes.tensor, small.pred_boxes.tensor, iou=0.9) >= 0.99


def test_bad_backend_choices_name_the_flag(eager, monkeypatch):
    model = eager.model
    kw = dict(model=model, input_format="RGB", patch_size=256, overlap=64)
    with pytest.raises(ValueError, match=r"--backend 'tensorrt' must be one of \('torch', 'onnxruntime', 'openvino'\)"):
        TiledPredictor(**kw, backend="tensorrt")
    with pytest.raises(ValueError, match="--precision 'bf16' is for --backend torch"):
        TiledPredictor(**kw, backend="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="--channels-last is for --backend torch"):
        TiledPredictor(**kw, backend="openvino", channels_last=True)
    with pytest.raises(ValueError, match=r"--backend onnxruntime runs in \['fp32'\]"):
        TiledPredictor(**kw, backend="onnxruntime", precision="bf16")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(ImportError, match=r"--backend openvino.*pip install openvino=="):
        TiledPredictor(**kw, backend="openvino")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_runtime_backends_run_voting_and_leave_the_model(image, backend):
    """Distribution voting (the tree recipe) runs in PyTorch on the runtime's head outputs; the
    model's own modules are back in place after each call."""
    torch.manual_seed(0)
    cfg = tiny_cfg("trees/gfl_lite0_trees.yaml", **{"MODEL_EMA.ENABLED": False})
    assert cfg.MODEL.GFL.BOX_VOTING.ENABLED
    eager = TiledPredictor(cfg, patch_size=256, overlap=64, backend="torch")
    with torch.no_grad():
        nn.init.normal_(eager.model.head.cls_score.weight, std=0.05)
        nn.init.constant_(eager.model.head.cls_score.bias, -1.0)
        nn.init.normal_(eager.model.head.box_pred.weight, std=0.05)
    backbone, head = eager.model.backbone, eager.model.head
    ours = TiledPredictor(model=eager.model, input_format="RGB", patch_size=256, overlap=64,
                          backend=backend)
    want, got = eager(image).instances, ours(image).instances
    assert eager.model.backbone is backbone and eager.model.head is head
    assert len(want) > 50
    assert box_agreement(want.pred_boxes.tensor, got.pred_boxes.tensor, iou=0.9) >= 0.99
    assert box_agreement(got.pred_boxes.tensor, want.pred_boxes.tensor, iou=0.9) >= 0.99


def test_openvino_bf16_runs_close_to_fp32(eager, image):
    """``--precision bf16`` with ``--backend openvino`` is OpenVINO's bf16 inference hint."""
    fp32 = eager(image).instances
    bf16 = TiledPredictor(model=eager.model, input_format="RGB", patch_size=256, overlap=64,
                          backend="openvino", precision="bf16")(image).instances
    assert len(bf16) > 50
    assert box_agreement(fp32.pred_boxes.tensor, bf16.pred_boxes.tensor, iou=0.5) >= 0.9


def test_default_falls_back_to_torch_without_openvino(eager, monkeypatch, caplog):
    """The CPU default (OpenVINO) is not an error when the package is missing: eager NHWC."""
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with caplog.at_level("WARNING"):
        fallback = TiledPredictor(model=eager.model, input_format="RGB", patch_size=256, overlap=64)
    assert (fallback.backend_name, fallback.channels_last) == ("torch", True)
    assert "pip install openvino==" in caplog.text and "running --backend torch" in caplog.text


@pytest.mark.parametrize("backend,precision", [("onnxruntime", "fp32"), ("openvino", "fp32"),
                                               ("torch", "bf16")])
def test_tta_runs_through_every_backend(eager, image, backend, precision):
    """Test-time augmentation of the tiles (as the tree recipe's: sizes x 8 symmetries, WBF)
    runs each version through the backend: the runtimes (one graph per version size) and bf16
    give eager fp32's TTA detections."""
    from gfocal.inference.test_time_augmentation import TestTimeAugmentation

    cfg = tiny_cfg("trees/gfl_lite0_trees.yaml", **{"TEST.AUG.MIN_SIZES": (224, 256),
                                                     "TEST.AUG.MAX_SIZE": 256})
    assert cfg.TEST.AUG.DIHEDRAL and cfg.TEST.AUG.MERGE == "wbf"
    kw = dict(model=eager.model, input_format="RGB", patch_size=256, overlap=64,
              tta=TestTimeAugmentation(cfg, eager.model))
    crop = image[:256, :256]  # one tile
    want = TiledPredictor(**kw, backend="torch", precision="fp32")(crop).instances
    got = TiledPredictor(**kw, backend=backend, precision=precision)(crop).instances
    assert len(want) > 20
    iou = 0.9 if precision == "fp32" else 0.5
    share = 0.95 if precision == "fp32" else 0.8
    assert box_agreement(want.pred_boxes.tensor, got.pred_boxes.tensor, iou=iou) >= share
    assert box_agreement(got.pred_boxes.tensor, want.pred_boxes.tensor, iou=iou) >= share
