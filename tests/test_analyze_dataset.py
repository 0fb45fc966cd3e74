"""tools/analyze_dataset.py and gfocal/data/analysis.py: the distances it reports are the DFL
targets the model trains on (same anchors, same ATSS assignment, same clamp), and its
recommendation follows them."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import REPO_ROOT, tiny_cfg
from gfocal.data.analysis import (
    CLAMP_MARGIN,
    LevelStats,
    _Anchors,
    analyze_boxes,
    covering_reg_max,
    level_strides,
    recommend,
    synthetic_coco_sized_records,
)
from gfocal.data.tree_crowns import deepforest_data_dir
import gfocal.modeling.gfl as gfl_module

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import analyze_dataset  # noqa: E402

sys.path.pop(0)


def test_anchors_are_the_models(toy_image):
    model = build_model(tiny_cfg())
    backbone = model.backbone
    strides = [backbone.output_shape()[f].stride for f in model.head_in_features]
    anchors = _Anchors(strides, 8.0, 0.0, backbone.size_divisibility)
    for height, width in ((128, 160), (100, 257)):
        d = backbone.size_divisibility
        padded = torch.zeros(1, 3, -(-height // d) * d, -(-width // d) * d)
        features = backbone(padded)
        theirs = model.anchor_generator([features[f] for f in model.head_in_features])
        ours, counts = anchors(height, width)
        assert counts == [len(a) for a in theirs]
        assert torch.equal(ours, torch.cat([a.tensor for a in theirs]))


def test_distances_are_the_dfl_targets_of_training(toy_image, monkeypatch):
    """The model's DFL targets (captured in its loss) = the analysis' distances clamped."""
    reg_max = 4  # small, so that some targets clamp
    model = build_model(tiny_cfg(**{"MODEL.GFL.REG_MAX": reg_max}))
    model.train()
    captured = []
    real = gfl_module.distribution_focal_loss

    def spy(logits, target, *args, **kwargs):
        captured.append(target.detach().clone())
        return real(logits, target, *args, **kwargs)

    monkeypatch.setattr(gfl_module, "distribution_focal_loss", spy)
    with EventStorage():
        model([toy_image])
    boxes = toy_image["instances"].gt_boxes.tensor.numpy().astype(np.float64)
    known = {k: v.stride for k, v in model.backbone.output_shape().items()}
    strides = level_strides(model.head_in_features, known)
    stats, counts = analyze_boxes(
        [((128, 160), boxes)], model.head_in_features, strides, [128], 1333, topk=model.topk,
        size_divisibility=model.backbone.size_divisibility)
    ours = np.sort(np.concatenate([s.distances for s in stats]).clip(0, reg_max - CLAMP_MARGIN))
    theirs = np.sort(captured[0].numpy())
    assert len(theirs) > 0 and np.allclose(ours, theirs, atol=1e-4)
    clamped = sum(s.clamped(reg_max) for s in stats)
    assert clamped > 0 and clamped == int(np.isclose(theirs, reg_max - CLAMP_MARGIN).sum())
    assert counts == {"boxes": 2, "unassigned": 0}


def _stats(*levels):
    return [LevelStats(name, stride, np.asarray(d, dtype=np.float64)) for name, stride, d in levels]


def test_recommendation_rules():
    # Everything within REG_MAX 16: keep it; the covering value is reported beside it.
    fits = _stats(("p3", 8, [1.0, 2.0, 7.5, 3.0] * 50), ("p4", 16, [2.0, 3.0, 4.0, 5.0] * 50))
    rec = recommend(fits, reg_max=16)
    assert rec["reg_max"] == 16 and rec["clamped"] == 0 and rec["covering_reg_max"] == 8
    assert rec["in_features"] == ["p3", "p4"]
    # Targets beyond REG_MAX 4 - 0.1 clamp: recommend the covering value and a coarser level.
    far = _stats(("p3", 8, [1.0, 2.0] * 100), ("p4", 16, [3.0, 6.2, 9.5, 2.0] * 50))
    rec = recommend(far, reg_max=4)
    assert rec["clamped"] == 100 and rec["reg_max"] == covering_reg_max(far, 0.001) == 10
    assert rec["in_features"] == ["p3", "p4", "p5"]
    # A pyramid end with under 1% of the positives is proposed for removal.
    sparse = _stats(("p3", 8, [1.0] * 4000), ("p4", 16, [1.0] * 400), ("p5", 32, [1.0] * 4))
    assert recommend(sparse, reg_max=16)["in_features"] == ["p3", "p4"]


def test_synthetic_coco_sized_boxes():
    records = synthetic_coco_sized_records(400, seed=1)
    sides = np.array([np.sqrt((a["bbox"][2] - a["bbox"][0]) * (a["bbox"][3] - a["bbox"][1]))
                      for r in records for a in r["annotations"]])
    assert len(sides) == 2800
    assert abs((sides < 32).mean() - 0.41) < 0.04 and abs((sides < 96).mean() - 0.76) < 0.04


def test_command_on_a_voc_folder(tmp_path, capsys):
    voc = tmp_path / "voc"
    voc.mkdir()
    for stem in ("OSBS_029", "SOAP_061"):
        for ext in (".xml", ".png"):
            shutil.copy(os.path.join(deepforest_data_dir(), stem + ext), voc)
    out = tmp_path / "out"
    assert analyze_dataset.main([
        "--config-file", os.path.join(REPO_ROOT, "configs", "trees", "gfl_lite0_trees.yaml"),
        "--dataset", f"analysis_voc_{os.getpid()}=voc:{voc}", "--output", str(out),
        "MODEL.GFL.REG_MAX", "2",
    ]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["box_sizes"]["boxes"] == 98 and report["config"]["REG_MAX"] == 2
    assert report["clamped"] > 0 and report["recommended"]["REG_MAX"] > 2
    assert f"MODEL.GFL.REG_MAX {report['recommended']['REG_MAX']}" in text
    assert (out / "distances.png").stat().st_size > 5000


def test_command_on_synthetic_coco_sized_data(tmp_path, capsys):
    out = tmp_path / "out"
    assert analyze_dataset.main([
        "--config-file", os.path.join(REPO_ROOT, "configs", "gfl_R_50_FPN_1x.yaml"),
        "--synthetic-coco", "30", "--output", str(out), "MODEL.RESNETS.DEPTH", "18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    ]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["level"] for r in report["levels"]] == ["p3", "p4", "p5", "p6", "p7"]
    assert [r["stride"] for r in report["levels"]] == [8, 16, 32, 64, 128]
    assert sum(r["positives"] for r in report["levels"]) * 4 == report["targets"]
    assert "Recommendation: MODEL.GFL.REG_MAX" in capsys.readouterr().out


def test_unregistered_name_is_an_error(tmp_path, capsys):
    assert analyze_dataset.main([
        "--config-file", os.path.join(REPO_ROOT, "configs", "gfl_R_50_FPN_1x.yaml"),
        "--analyze", "no_such_dataset", "--output", str(tmp_path)]) == 2
    assert "'no_such_dataset' is not registered" in capsys.readouterr().err
