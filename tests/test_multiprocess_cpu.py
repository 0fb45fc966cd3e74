"""Training in several CPU processes through train_net.py (gloo, DistributedDataParallel without
device_ids), and the top block built only for the levels the head reads (DDP refuses parameters
that get no gradient)."""
import os
import subprocess
import sys

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "levels, top_keys",
    [
        (["p3", "p4", "p5", "p6", "p7"], {"p6", "p7"}),  # COCO configs: checkpoint keys kept
        (["p3", "p4", "p5", "p6"], {"p6"}),
        (["p3", "p4", "p5"], set()),
    ],
)
def test_top_block_has_the_levels_the_head_reads(levels, top_keys, toy_image):
    model = build_model(tiny_cfg(**{"MODEL.GFL.IN_FEATURES": levels}))
    names = [n for n, _ in model.named_parameters()]
    assert {n.split(".")[2] for n in names if n.startswith("backbone.top_block.")} == top_keys
    assert sorted(model.backbone.output_shape()) == levels
    model.train()
    with EventStorage():
        sum(model([toy_image]).values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.trains_in_subprocess
def test_two_cpu_processes_train_through_train_net(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-W", "ignore", os.path.join(REPO, "train_net.py"), "--num-gpus", "2",
        "--config-file", os.path.join(REPO, "configs", "trees", "gfl_lite0_trees.yaml"),
        "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(2,)", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "256", "DATASETS.TEST", "()",
        "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.5", "OUTPUT_DIR", str(out),
    ]
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log and (out / "log.txt.rank1").is_file()
    assert "Starting training from iteration 0" in log
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert state["iteration"] == 2 and not any(k.startswith("module.") for k in state["model"])
    # Weight EMA under DDP: the averages of the unwrapped model's tensors, 3 updates; the frozen
    # (feature-cached) backbone is exactly the model's, the trained head is not.
    ema = state["ema_state"]
    assert ema["num_updates"] == 3 and ema["state"].keys() >= state["model"].keys()
    frozen = [k for k in state["model"] if k.startswith("backbone.bottom_up.")]
    assert frozen and all(torch.equal(ema["state"][k], state["model"][k]) for k in frozen)
    assert not torch.equal(ema["state"]["head.cls_score.weight"], state["model"]["head.cls_score.weight"])
