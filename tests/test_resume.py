"""A run stopped after N iterations and restarted with resume continues at iteration N with the
weights, optimizer state and learning rate that the uninterrupted run had there."""
import copy
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from conftest import REPO_ROOT, tiny_cfg
from gfocal.model_io.checkpoint import GFLCheckpointer

DATASET = "reliability_resume"
STOP_AFTER = 2  # iterations done when the run is killed (a checkpoint is written at iteration 2)


def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO_ROOT, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Killed(Exception):
    pass


class _Recorder(HookBase):
    """Before each step: a copy of the weights, the optimizer state and the learning rates."""

    def __init__(self, log, kill_after=None):
        self.log, self.kill_after = log, kill_after

    def before_step(self):
        optimizer = self.trainer.optimizer
        self.log[self.trainer.iter] = {
            "model": {k: v.clone() for k, v in self.trainer.model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "lr": [g["lr"] for g in optimizer.param_groups],
        }

    def after_step(self):
        if self.kill_after is not None and self.trainer.iter + 1 == self.kill_after:
            raise _Killed()


def _make_trainer(cfg, log, batches, kill_after=None):
    base = _train_net().Trainer

    class RecordingTrainer(base):
        def build_hooks(self):
            return super().build_hooks() + [_Recorder(log, kill_after)]

        @classmethod
        def build_train_loader(cls, cfg):
            loader = base.build_train_loader(cfg)

            def recording():
                for batch in loader:
                    batches.append([d["image_id"] for d in batch])
                    yield batch

            return recording()

    seed_all_rng(0)  # model init and the sampler's shuffling seed
    return RecordingTrainer(cfg)


@pytest.fixture(scope="module")
def cfg_factory(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        path = str(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        x, y = 4 + 6 * i, 8 + 3 * i
        records.append({"file_name": path, "image_id": i, "height": 64, "width": 64, "annotations": [
            {"bbox": [x, y, x + 30, y + 24], "bbox_mode": 0, "category_id": i % 3}]})
    if DATASET not in DatasetCatalog.list():
        DatasetCatalog.register(DATASET, lambda: copy.deepcopy(records))
        MetadataCatalog.get(DATASET).thing_classes = ["a", "b", "c"]

    def make(name):
        return tiny_cfg(**{
            "DATASETS.TRAIN": (DATASET,), "DATASETS.TEST": (), "TEST.EVAL_PERIOD": 0,
            "DATALOADER.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 2, "SOLVER.BASE_LR": 0.01,
            "SOLVER.MAX_ITER": 3, "SOLVER.CHECKPOINT_PERIOD": STOP_AFTER,
            "SOLVER.WARMUP_ITERS": 2, "SOLVER.STEPS": (2,), "MODEL.BACKBONE.FREEZE_AT": 5,
            "INPUT.MIN_SIZE_TRAIN": (64,), "INPUT.MAX_SIZE_TRAIN": 64, "INPUT.RANDOM_FLIP": "none",
            "OUTPUT_DIR": str(folder / name),
        })

    return make


def _same_optimizer_state(a, b) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(
        torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i]
    )


def test_resume_continues_exactly_where_the_run_stopped(cfg_factory):
    full_log, full_batches = {}, []
    full = _make_trainer(cfg_factory("full"), full_log, full_batches)
    assert isinstance(full.checkpointer, GFLCheckpointer)
    full.resume_or_load(resume=False)
    full.train()

    cfg = cfg_factory("interrupted")
    killed = _make_trainer(cfg, {}, [], kill_after=STOP_AFTER)
    killed.resume_or_load(resume=False)
    with pytest.raises(_Killed):
        killed.train()
    saved = sorted(f for f in os.listdir(cfg.OUTPUT_DIR) if f.endswith(".pth") or f == "last_checkpoint")
    assert saved == ["last_checkpoint", "model_0000001.pth"]

    resumed_log, resumed_batches = {}, []
    resumed = _make_trainer(cfg, resumed_log, resumed_batches)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == STOP_AFTER
    resumed.train()

    assert sorted(resumed_log) == [STOP_AFTER]
    a, b = full_log[STOP_AFTER], resumed_log[STOP_AFTER]  # the state right after loading
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _same_optimizer_state(a["optimizer"], b["optimizer"])
    assert b["lr"] == a["lr"] != full_log[STOP_AFTER - 1]["lr"]  # after the LR step at 2
    # detectron2's TrainingSampler restarts its sequence: the resumed run sees the batches that
    # the uninterrupted one saw at iterations 0 and 1 again (see the README).
    assert resumed_batches[:1] == full_batches[:1] != full_batches[2:3]
