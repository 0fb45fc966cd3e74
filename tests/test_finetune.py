"""Fine-tuning from a COCO GFL checkpoint in the official (mmdetection) key layout on a dataset with
other classes, end to end through the documented commands (docs/own_data.md): convert with
tools/convert_mmdet_gfl.py, then train_net.py with ``--dataset`` and
``MODEL.GFL.CHECKPOINT_HEAD_MISMATCH reinit``, evaluated by COCOEvaluator and precision/recall."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from gfocal.data.tree_crowns import deepforest_data_dir
from test_conversion import mmdet_gfl_state_dict

DATA = deepforest_data_dir()
R18 = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
       "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.GFL.NUM_CONVS", "1"]


def coco_like_state_dict():
    """An 80-class R-18 GFL in mmdetection's keys with trained-like statistics (unit BN, He-init
    convs), so that the converted model gives finite outputs."""
    torch.manual_seed(0)
    sd = mmdet_gfl_state_dict(depth=18, fpn_channels=64, stacked_convs=1, make=torch.empty)
    for key, value in sd.items():
        if key.endswith("running_var") or (value.dim() == 1 and key.endswith("weight")):
            value.fill_(1.0)
        elif key.endswith(("running_mean", "bias")):
            value.zero_()
        elif key.endswith(".scale"):
            value.fill_(1.0)
        elif value.dim() == 4:
            value.normal_(0.0, (2.0 / value[0].numel()) ** 0.5)
    sd["bbox_head.gfl_cls.bias"].fill_(-4.6)
    return sd


def run(cmd, env=None):
    proc = subprocess.run([sys.executable, "-W", "ignore", *cmd], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.trains_in_subprocess
def test_finetune_from_an_mmdet_coco_checkpoint_on_a_voc_dataset(tmp_path):
    # A small VOC dataset with other classes (deepforest's SOAP_061: 'Alive', 'Dead'; OSBS_029: 'Tree').
    voc = tmp_path / "voc"
    voc.mkdir()
    for stem in ("OSBS_029", "SOAP_061"):
        for ext in (".xml", ".png"):
            shutil.copy(os.path.join(DATA, stem + ext), voc)
    source = coco_like_state_dict()
    mmdet_file, converted = tmp_path / "gfl_coco_mmdet.pth", tmp_path / "gfl_coco_d2.pth"
    torch.save({"state_dict": source, "meta": {"mmdet_version": "2.25.0"}}, mmdet_file)
    config = os.path.join("configs", "mmdet", "gfl_R_50_FPN_1x.yaml")

    run(["tools/convert_mmdet_gfl.py", "--config-file", config, "--input", str(mmdet_file),
         "--output", str(converted), *R18])

    out = tmp_path / "out"
    log = run([
        "train_net.py", "--config-file", config,
        "--dataset", f"ft_train=voc:{voc}", "--dataset", f"ft_val=csv:{DATA}/testfile_deepforest.csv:{voc}",
        "--classes", "Alive,Dead,Tree",
        "MODEL.WEIGHTS", str(converted), "MODEL.GFL.NUM_CLASSES", "3",
        "MODEL.GFL.CHECKPOINT_HEAD_MISMATCH", "reinit", *R18,
        "DATASETS.TRAIN", "('ft_train',)", "DATASETS.TEST", "('ft_val',)",
        "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3",
        "SOLVER.STEPS", "()", "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "256",
        "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "256", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.GFL.SCORE_THRESH_TEST", "0.0", "TEST.PRECISION_RECALL.ENABLED", "True",
        "OUTPUT_DIR", str(out),
    ])
    # Only the class conv is re-initialised, and the log says so.
    line = re.search(r"re-initialised (\[.*?\]); loaded the other (\d+) tensors", log)
    assert line, log[-3000:]
    assert line.group(1) == "['head.cls_score.bias', 'head.cls_score.weight']"
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert int(line.group(2)) == len(final) - 2
    # The linear scaling rule for 2 images per batch (the COCO config's lr is for 16).
    assert "SOLVER.BASE_LR 0.01 -> 0.00125, SOLVER.WARMUP_ITERS 500 -> 4000" in log
    # Frozen stem (FREEZE_AT 2): exactly the COCO tensors; FPN and box branch start from them.
    assert torch.equal(final["backbone.bottom_up.stem.conv1.weight"], source["backbone.conv1.weight"])
    for ours, theirs in (("backbone.fpn_output3.weight", "neck.fpn_convs.0.conv.weight"),
                         ("head.box_pred.weight", "bbox_head.gfl_reg.weight")):
        assert torch.allclose(final[ours], source[theirs], atol=1e-2), ours
        assert final[ours].shape == source[theirs].shape
    assert final["head.cls_score.weight"].shape[0] == 3
    # Evaluation of the CSV dataset: COCO AP and precision/recall, class names from the metadata.
    assert "copypaste: AP,AP50" in log and "ft_val" in log
    inference = out / "inference" / "ft_val"
    coco_copy = json.loads((inference / "ft_val_coco_format.json").read_text())
    assert [c["name"] for c in coco_copy["categories"]] == ["Alive", "Dead", "Tree"]
    assert len(coco_copy["annotations"]) == 61
    pr = json.loads((inference / "precision_recall.json").read_text())
    assert pr["iou"] == 0.4 and 0.0 <= pr["recall"] <= 100.0 and "best_f1" in pr
