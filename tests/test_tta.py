"""Test-time augmentation (gfocal/inference/test_time_augmentation.py, TEST.AUG.*) and weighted
box fusion (gfocal/modeling/box_fusion.py)."""
import importlib.util
import os

import pytest
import torch
from torch import nn

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import REPO_ROOT, tiny_cfg
from gfocal.modeling.box_fusion import weighted_box_fusion
from gfocal.inference.test_time_augmentation import DatasetMapperTTA, GFLWithTTA


def _tta_cfg(**aug):
    cfg = tiny_cfg(**{"MODEL.GFL.SCORE_THRESH_TEST": 0.0})  # untrained: keep detections
    cfg.TEST.AUG.ENABLED = True
    for k, v in aug.items():
        cfg.TEST.AUG[k] = v
    return cfg


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)


def test_identity_tta_equals_plain_inference():
    cfg = _tta_cfg(MIN_SIZES=(96,), MAX_SIZE=4000, FLIP=False, DIHEDRAL=False, MERGE="nms")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = [{"image": _image(96, 128), "height": 96, "width": 128}]
    with torch.no_grad():
        plain = model(inputs)[0]["instances"]
        tta = GFLWithTTA(cfg, model)(inputs)[0]["instances"]
    assert len(plain) > 10
    assert tta.image_size == plain.image_size
    assert torch.equal(tta.pred_boxes.tensor, plain.pred_boxes.tensor)
    assert torch.equal(tta.scores, plain.scores)
    assert torch.equal(tta.pred_classes, plain.pred_classes)


class _BrightBox(nn.Module):
    """A 'detector' whose one detection is the exact bounding box of the non-zero pixels."""

    def forward(self, inputs):
        out = []
        for x in inputs:
            ys, xs = torch.nonzero(x["image"][0] > 0, as_tuple=True)
            inst = Instances(tuple(x["image"].shape[1:]))
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            inst.pred_boxes = Boxes(torch.tensor([box], dtype=torch.float32))
            inst.scores = torch.tensor([0.9])
            inst.pred_classes = torch.tensor([0])
            out.append({"instances": inst})
        return out


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_dihedral_versions_map_back_exactly(merge):
    cfg = _tta_cfg(MIN_SIZES=(60,), MAX_SIZE=4000, DIHEDRAL=True, MERGE=merge)
    image = torch.zeros(3, 60, 80, dtype=torch.uint8)
    image[:, 5:12, 20:33] = 255  # box x 20..33, y 5..12
    x = {"image": image, "height": 60, "width": 80}
    versions = DatasetMapperTTA.from_config(cfg)(x)
    assert len(versions) == 8
    assert len({tuple(v["image"].shape) for v in versions}) == 2  # transposed: 80 x 60
    assert len({v["image"].numpy().tobytes() for v in versions}) == 8  # all 8 symmetries
    tta = GFLWithTTA(cfg, _BrightBox())
    result = tta([x])[0]["instances"]
    assert len(result) == 1  # the 8 detections, mapped back, coincide
    assert result.pred_boxes.tensor.tolist() == [[20.0, 5.0, 33.0, 12.0]]
    assert result.scores.tolist() == pytest.approx([0.9])

    # Multi-scale: versions at 30 px are mapped back to the input's pixels by the resize scale.
    cfg.TEST.AUG.MIN_SIZES = (30, 60)
    cfg.TEST.AUG.DIHEDRAL = False
    cfg.TEST.AUG.FLIP = True
    versions = DatasetMapperTTA.from_config(cfg)(x)
    assert [tuple(v["image"].shape[1:]) for v in versions] == [(30, 40)] * 2 + [(60, 80)] * 2
    box = versions[1]["transforms"].apply_box([[20.0, 5.0, 33.0, 12.0]])
    assert box.tolist() == [[40 - 16.5, 2.5, 40 - 10.0, 6.0]]  # halved, flipped in 40 px
    assert versions[1]["transforms"].inverse().apply_box(box).tolist() == [[20.0, 5.0, 33.0, 12.0]]


def test_bad_keys():
    with pytest.raises(ValueError, match="TEST.AUG.MERGE"):
        GFLWithTTA(_tta_cfg(MERGE="mean"), _BrightBox())
    with pytest.raises(ValueError, match="TEST.AUG.MIN_SIZES"):
        DatasetMapperTTA([], 100, False)


def test_weighted_box_fusion():
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],  # version 1
        [1.0, 1.0, 11.0, 11.0],  # version 2, IoU 0.68 with the first: fused
        [50.0, 50.0, 60.0, 60.0],  # version 2 only
        [0.0, 0.0, 10.0, 10.0],  # other class: not fused with the first
    ])
    scores = torch.tensor([0.8, 0.4, 0.6, 0.5])
    classes = torch.tensor([0, 0, 0, 1])
    out_boxes, out_scores, out_classes = weighted_box_fusion(boxes, scores, classes, 2, 0.55)
    assert out_classes.tolist() == [0, 0, 1]
    fused = (0.8 * boxes[0] + 0.4 * boxes[1]) / 1.2
    assert torch.allclose(out_boxes[0], fused)
    # Mean score x min(members, versions) / versions: 0.6 x 2/2, 0.6 x 1/2, 0.5 x 1/2.
    assert out_scores.tolist() == pytest.approx([0.6, 0.3, 0.25])
    assert torch.equal(out_boxes[1], boxes[2]) and torch.equal(out_boxes[2], boxes[3])
    # Above the IoU threshold nothing fuses.
    assert len(weighted_box_fusion(boxes, scores, classes, 2, 0.7)[0]) == 4
    empty = weighted_box_fusion(boxes[:0], scores[:0], classes[:0], 2)
    assert empty[0].shape == (0, 4)


def test_train_net_names_tta_results(monkeypatch):
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO_ROOT, "train_net.py"))
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    cfg = _tta_cfg()
    cfg.DATASETS.TEST = ("a", "b")
    cfg.OUTPUT_DIR = "/nonexistent"
    calls = []

    def fake_test(cfg, model, evaluators=None):
        calls.append((type(model).__name__, evaluators))
        return {"a": {"bbox": {"AP": 1.0}}, "b": {"bbox": {"AP": 2.0}}}

    monkeypatch.setattr(train_net.Trainer, "test", staticmethod(fake_test))
    monkeypatch.setattr(train_net.Trainer, "build_evaluator",
                        classmethod(lambda cls, cfg, name, folder=None: (name, folder)))
    res = train_net.Trainer.test_all(cfg, _BrightBox())
    assert list(res) == ["a", "b", "a_TTA", "b_TTA"]
    assert calls[1][0] == "GFLWithTTA"
    assert calls[1][1] == [("a", "/nonexistent/inference_TTA/a"), ("b", "/nonexistent/inference_TTA/b")]
