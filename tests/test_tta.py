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


def _tiled(cfg, model, **kwargs):
    from gfocal.inference import TiledPredictor
    from gfocal.inference.test_time_augmentation import TestTimeAugmentation

    return TiledPredictor(model=model, input_format=cfg.INPUT.FORMAT, patch_size=128, overlap=32,
                          backend="torch", tta=TestTimeAugmentation(cfg, model), **kwargs)


def test_tiled_prediction_with_one_identity_version_is_plain_tiled_prediction():
    from gfocal.inference import TiledPredictor

    cfg = _tta_cfg(MIN_SIZES=(128,), MAX_SIZE=4000, FLIP=False, DIHEDRAL=False, MERGE="nms")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = _image(200, 260).permute(1, 2, 0).numpy()
    plain = TiledPredictor(model=model, input_format="BGR", patch_size=128, overlap=32,
                           backend="torch")(image).instances
    tta = _tiled(cfg, model)(image).instances
    assert len(plain) > 20
    assert torch.equal(tta.pred_boxes.tensor, plain.pred_boxes.tensor)
    assert torch.equal(tta.scores, plain.scores)


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_tiled_tta_of_a_one_tile_image_is_the_evaluations_tta(merge):
    """The tiled predictor runs the versions (3 sizes x 8 symmetries) of each tile and merges
    them as the evaluation's TTA does; an image of one patch gives the same detections (with
    NMS; WBF's fused boxes then pass the seam merge's NMS, a subset)."""
    cfg = _tta_cfg(MIN_SIZES=(112, 128, 144), MAX_SIZE=4000, DIHEDRAL=True, MERGE=merge)
    cfg.TEST.DETECTIONS_PER_IMAGE = 1001  # the caps of both: the tiled one's is tile_max_dets + 1
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = _image(128, 128, seed=1)
    calls = []
    forward = model.forward
    model.forward = lambda inputs: calls.append(len(inputs)) or forward(inputs)
    tiled = _tiled(cfg, model, tile_max_dets=1000)
    got = tiled(image.permute(1, 2, 0).numpy()[:, :, ::-1]).instances  # RGB: the model's BGR
    assert sum(calls) == 24 and max(calls) <= tiled.batch_size
    calls.clear()
    with torch.no_grad():
        want = GFLWithTTA(cfg, model)([{"image": image, "height": 128, "width": 128}])[0]["instances"]
    assert sum(calls) == 24
    assert len(got) > 10
    key = lambda inst: sorted(zip(inst.scores.tolist(), inst.pred_boxes.tensor.tolist()))  # noqa: E731
    if merge == "nms":
        assert len(got) == len(want)
        for (s0, b0), (s1, b1) in zip(key(got), key(want)):
            assert s0 == pytest.approx(s1, abs=1e-6) and b0 == pytest.approx(b1, abs=1e-4)
    else:
        wanted = {tuple(round(v, 3) for v in b) for _, b in key(want)}
        assert {tuple(round(v, 3) for v in b) for _, b in key(got)} <= wanted


def test_tiled_tta_keeps_the_per_tile_cap_and_is_built_from_the_config():
    from gfocal.inference import TiledPredictor

    cfg = _tta_cfg(MIN_SIZES=(128,), MAX_SIZE=4000, DIHEDRAL=True, MERGE="wbf")
    cfg.TEST.AUG.ENABLED = False  # tta=True asks for it whatever the evaluation does
    torch.manual_seed(0)
    tiled = TiledPredictor(cfg, patch_size=128, overlap=32, tile_max_dets=7, tta=True)
    assert tiled.tta is not None and tiled.tta.merge == "wbf"
    assert tiled.tta.max_detections == 8  # the cap + 1, so that a cut tile is known
    found, cut = tiled.run_tiles([_image(128, 128).permute(1, 2, 0).numpy()])
    assert cut == [True] and len(found[0]) == 7
    assert TiledPredictor(cfg, patch_size=128, overlap=32).tta is None


def _wbf_reference(boxes, scores, classes, num_versions, iou_thresh):
    """The fusion rule written plainly in torch: every fused box recomputed at every step."""
    from detectron2.structures import pairwise_iou

    order = torch.argsort(scores, descending=True, stable=True)
    boxes, scores, classes = boxes[order].double(), scores[order].double(), classes[order]
    members = []  # per cluster: (class, [indices])
    for i in range(len(boxes)):
        best, best_iou = -1, iou_thresh
        for k, (cls, idx) in enumerate(members):
            w = scores[idx]
            mean = (w[:, None] * boxes[idx]).sum(0) / w.sum()
            iou = float(pairwise_iou(Boxes(boxes[i : i + 1]), Boxes(mean[None]))[0, 0])
            if cls == classes[i] and iou > best_iou:
                best, best_iou = k, iou
        if best < 0:
            members.append((classes[i], [i]))
        else:
            members[best][1].append(i)
    out = []
    for cls, idx in members:
        w = scores[idx]
        score = w.sum() / len(idx) * min(len(idx), num_versions) / num_versions
        out.append(((w[:, None] * boxes[idx]).sum(0) / w.sum(), float(score), int(cls)))
    out.sort(key=lambda t: -t[1])
    return out


@pytest.mark.parametrize("iou", [0.3, 0.55])
def test_weighted_box_fusion_follows_the_rule_on_random_sets(iou):
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(20, 2, generator=g) * 200
    boxes = torch.cat([torch.cat([centres + torch.randn(20, 2, generator=g) * 2,
                                  centres + 25 + torch.randn(20, 2, generator=g) * 4], 1)
                       for _ in range(6)])
    scores = 0.05 + torch.rand(len(boxes), generator=g)
    classes = torch.randint(0, 2, (len(boxes),), generator=g)
    got = weighted_box_fusion(boxes, scores, classes, 6, iou)
    want = _wbf_reference(boxes, scores, classes, 6, iou)
    assert len(got[0]) == len(want) and 20 <= len(want) < len(boxes)
    for box, score, cls, (wbox, wscore, wcls) in zip(*got, want):
        assert torch.allclose(box.double(), wbox, atol=1e-4) and int(cls) == wcls
        assert float(score) == pytest.approx(wscore, abs=1e-6)
