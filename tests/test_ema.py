"""Weight EMA (gfocal/engine/hooks/ema.py, MODEL_EMA.*): the update rule, frozen tensors, the checkpoint and
--resume, the start of the averages at the weights training starts from (MODEL.WEIGHTS, a resumed
checkpoint), and which weights the evaluation sees."""
import copy
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from conftest import tiny_cfg
from gfocal.engine.hooks.ema import EMAHook, EMAState

DATASET = "ema_toy"


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.trained = nn.Linear(3, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.bn = nn.BatchNorm1d(2)


def test_update_rule_and_frozen_tensors():
    torch.manual_seed(0)
    model = Toy()
    ema = EMAState().copy_from(model)
    start = {k: v.clone() for k, v in ema.state.items()}
    frozen_before = model.frozen.weight.clone()
    steps = []
    for _ in range(3):
        with torch.no_grad():
            model.trained.weight.add_(torch.randn_like(model.trained.weight))
            model.bn.running_mean.add_(1.0)
        model.bn.num_batches_tracked += 1
        steps.append(model.trained.weight.clone())
        ema.update(model, decay=0.9)
    expected = start["trained.weight"]
    for w in steps:
        expected = 0.9 * expected + 0.1 * w
    assert torch.allclose(ema.state["trained.weight"], expected, atol=1e-6)
    assert not torch.allclose(ema.state["trained.weight"], steps[-1])
    assert torch.allclose(ema.state["bn.running_mean"], torch.full((2,), 0.1 * (0.81 + 1.8 + 3.0)), atol=1e-6)
    assert ema.state["bn.num_batches_tracked"].item() == 3  # integer buffers are copied
    # A frozen tensor is bit-identical after any number of updates (no d*x + (1-d)*x rounding).
    assert torch.equal(ema.state["frozen.weight"], frozen_before)
    assert ema.num_updates == 3
    assert "frozen.weight" not in EMAState(include_frozen=False).copy_from(model).state
    assert "bn.running_mean" not in EMAState(include_buffer=False).copy_from(model).state


def test_decay_warm_up():
    ema = EMAState()
    assert ema.decay_at(0.999, -1) == 0.999
    assert ema.decay_at(0.999, 10) == pytest.approx(2 / 11)  # update 1: (1 + 1) / (10 + 1)
    ema.num_updates = 10_000
    assert ema.decay_at(0.999, 10) == 0.999


def test_apply_and_restore():
    model = Toy()
    ema = EMAState().copy_from(model)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema.state["trained.weight"] += 5.0
    with ema.apply_and_restore(model):
        assert torch.equal(model.trained.weight, ema.state["trained.weight"])
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not an EMA state"):
        ema.load_state_dict({"trained.weight": torch.zeros(2, 3)})
    with pytest.raises(KeyError, match="does not fit the model"):
        ema.load_state_dict({"state": {"other": torch.zeros(1)}, "num_updates": 1})
    with pytest.raises(ValueError, match="MODEL_EMA.DECAY"):
        EMAHook(ema, decay=1.5)


# ----------------------------------------------------------------------------------------------
# With the trainer of train_net.py (gfocal.engine.Trainer)
# ----------------------------------------------------------------------------------------------
class _Recorder(HookBase):
    """After each step: the raw weights and the EMA state (the EMA hook runs before this)."""

    def __init__(self, log):
        self.log = log

    def before_train(self):
        ema = getattr(self.trainer, "ema_state", None)
        self.log["init"] = None if ema is None else {k: v.clone() for k, v in ema.state.items()}

    def after_step(self):
        ema = getattr(self.trainer, "ema_state", None)
        self.log[self.trainer.iter] = {
            "model": {k: v.clone() for k, v in self.trainer.model.state_dict().items()},
            "ema": None if ema is None else {k: v.clone() for k, v in ema.state.items()},
        }


@pytest.fixture(scope="module")
def train_net():
    import gfocal.engine

    return gfocal.engine


@pytest.fixture(scope="module")
def cfg_factory(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ema")
    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        path = str(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        x, y = 4 + 6 * i, 8 + 3 * i
        records.append({"file_name": path, "image_id": i, "height": 64, "width": 64, "annotations": [
            {"bbox": [x, y, x + 30, y + 24], "bbox_mode": 0, "category_id": i % 3}]})
    if DATASET not in DatasetCatalog.list():
        DatasetCatalog.register(DATASET, lambda: copy.deepcopy(records))
        MetadataCatalog.get(DATASET).thing_classes = ["a", "b", "c"]

    def make(name, **overrides):
        return tiny_cfg(**{
            "DATASETS.TRAIN": (DATASET,), "DATASETS.TEST": (), "TEST.EVAL_PERIOD": 0,
            "DATALOADER.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 2, "SOLVER.BASE_LR": 0.01,
            "SOLVER.MAX_ITER": 3, "SOLVER.CHECKPOINT_PERIOD": 2, "SOLVER.WARMUP_ITERS": 0,
            "MODEL.BACKBONE.FREEZE_AT": 2, "INPUT.MIN_SIZE_TRAIN": (64,),
            "INPUT.MAX_SIZE_TRAIN": 64, "INPUT.RANDOM_FLIP": "none",
            "MODEL_EMA.ENABLED": True, "MODEL_EMA.DECAY": 0.6,
            "OUTPUT_DIR": str(folder / name), **overrides,
        })

    return make


def _run(train_net, cfg, log, resume=False):
    class RecordingTrainer(train_net.Trainer):
        def build_hooks(self):
            return super().build_hooks() + [_Recorder(log)]

    seed_all_rng(0)
    trainer = RecordingTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def ema_run(train_net, cfg_factory):
    log = {}
    return _run(train_net, cfg_factory("on"), log), log


def test_trainer_ema_checkpoint_resume_and_raw_weights(train_net, cfg_factory, ema_run):
    off = {}
    trainer, on = ema_run
    _run(train_net, cfg_factory("off", **{"MODEL_EMA.ENABLED": False}), off)
    assert off[2]["ema"] is None
    # EMA does not touch training: the raw weights are those of the run without it.
    for i in range(3):
        assert all(torch.equal(on[i]["model"][k], v) for k, v in off[i]["model"].items())
    # The EMA state follows the update rule over the recorded raw weights (frozen stem exact).
    trained = "head.cls_score.weight"
    frozen = next(n for n, p in trainer.model.named_parameters() if not p.requires_grad)
    expected = on["init"][trained]
    for i in range(3):
        expected = 0.6 * expected + 0.4 * on[i]["model"][trained]
    assert torch.allclose(on[2]["ema"][trained], expected, atol=1e-6)
    assert torch.equal(on[2]["ema"][frozen], on[2]["model"][frozen])
    saved = torch.load(os.path.join(trainer.cfg.OUTPUT_DIR, "model_final.pth"), weights_only=False)
    assert saved["ema_state"]["num_updates"] == 3
    assert torch.equal(saved["ema_state"]["state"][trained], on[2]["ema"][trained])
    assert torch.equal(saved["model"][trained], on[2]["model"][trained])  # "model": raw weights

    # Stopped after 2 steps (its checkpoint model_0000001.pth), resumed: the EMA state comes back.
    cfg = cfg_factory("resume")
    os.makedirs(cfg.OUTPUT_DIR)
    shutil.copy(os.path.join(trainer.cfg.OUTPUT_DIR, "model_0000001.pth"), cfg.OUTPUT_DIR)
    with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    resumed_log = {}
    resumed = _run(train_net, cfg, resumed_log, resume=True)
    assert resumed.start_iter == 2 and [k for k in resumed_log if k != "init"] == [2]
    ckpt = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_0000001.pth"), weights_only=False)
    assert ckpt["ema_state"]["num_updates"] == 2
    assert torch.equal(ckpt["ema_state"]["state"][trained], on[1]["ema"][trained])
    # The resumed run's one update (step 2) starts from the restored state, not from its weights.
    assert resumed.ema_state.num_updates == 3
    expected = 0.6 * ckpt["ema_state"]["state"][trained] + 0.4 * resumed_log[2]["model"][trained]
    assert torch.allclose(resumed.ema_state.state[trained], expected, atol=1e-6)


def test_evaluation_sees_ema_weights_then_raw(train_net, ema_run, monkeypatch):
    trainer, log = ema_run
    cfg = trainer.cfg.clone()
    cfg.defrost()
    cfg.MODEL_EMA.EVAL_RAW_MODEL = True
    cfg.DATASETS.TEST = (DATASET,)
    seen = []

    def fake_test(cfg, model, evaluators=None):
        seen.append(model.state_dict()["head.cls_score.weight"].clone())
        return {cfg.DATASETS.TEST[0]: {"bbox": {"AP": float(len(seen))}}}

    monkeypatch.setattr(train_net.Trainer, "test", staticmethod(fake_test))
    res = train_net.Trainer.test_all(cfg, trainer.model, trainer.ema_state)
    assert list(res) == [DATASET, DATASET + "_raw"]
    assert torch.equal(seen[0], trainer.ema_state.state["head.cls_score.weight"])
    assert torch.equal(seen[1], log[2]["model"]["head.cls_score.weight"])
    assert not torch.equal(seen[0], seen[1])
    # Afterwards the model holds its raw weights again.
    assert torch.equal(trainer.model.state_dict()["head.cls_score.weight"], seen[1])

    # --eval-only: MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY picks the checkpoint's EMA state.
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    cfg = cfg.clone()
    cfg.MODEL.WEIGHTS = final
    cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY = True
    model, ema_state = train_net.Trainer.build_for_eval(cfg)
    assert torch.equal(ema_state.state["head.cls_score.weight"], seen[0])
    assert torch.equal(model.state_dict()["head.cls_score.weight"], seen[1])
    cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY = False
    assert train_net.Trainer.build_for_eval(cfg)[1] is None

    # A checkpoint without EMA weights is refused with a message naming the key.
    plain = os.path.join(cfg.OUTPUT_DIR, "plain.pth")
    torch.save({"model": torch.load(final, weights_only=False)["model"]}, plain)
    cfg.MODEL.WEIGHTS = plain
    cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY = True
    with pytest.raises(KeyError, match="has no 'ema_state'"):
        train_net.Trainer.build_for_eval(cfg)


def _weights_file(cfg, path: str) -> dict:
    """A MODEL.WEIGHTS file of ``cfg``'s model with weights far from a fresh model's."""
    from detectron2.modeling import build_model as _build

    torch.manual_seed(1)
    model = _build(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": state}, path)
    return state


def test_averages_start_at_the_loaded_weights(train_net, cfg_factory, tmp_path):
    """MODEL.WEIGHTS loaded by resume_or_load (after the trainer and its EMA state were built):
    the averages start at those weights, not at the model's initialisation. With DECAY 1 the
    averages never move, so after training they are still the loaded weights, exactly."""
    cfg = cfg_factory("start_at_weights", **{"MODEL_EMA.DECAY": 1.0, "SOLVER.MAX_ITER": 2,
                                             "SOLVER.CHECKPOINT_PERIOD": 100})
    cfg.MODEL.WEIGHTS = str(tmp_path / "weights.pth")
    loaded = _weights_file(cfg, cfg.MODEL.WEIGHTS)
    log = {}
    trainer = _run(train_net, cfg, log)
    trained = "head.cls_score.weight"
    assert not torch.equal(log[1]["model"][trained], loaded[trained])  # the raw weights trained
    averages = trainer.ema_state.state
    assert trained in averages and set(loaded) <= set(averages)  # (pixel_mean: not saved)
    for name, weights in loaded.items():
        assert torch.equal(averages[name], weights), name
    assert trainer.ema_state.num_updates == 2


def test_fine_tuning_averages_the_fine_tuned_weights(train_net, cfg_factory, ema_run):
    """Fine-tuning from a checkpoint of an EMA run (MODEL.WEIGHTS, no --resume): the averages start
    at the checkpoint's raw weights (neither the new model's initialisation nor the checkpoint's
    own averages) and follow the update rule over the fine-tuned weights."""
    first, _ = ema_run
    weights = os.path.join(first.cfg.OUTPUT_DIR, "model_final.pth")
    saved = torch.load(weights, weights_only=False)
    cfg = cfg_factory("finetune", **{"SOLVER.BASE_LR": 0.005, "SOLVER.CHECKPOINT_PERIOD": 100})
    cfg.MODEL.WEIGHTS = weights
    log = {}
    trainer = _run(train_net, cfg, log)
    trained = "head.cls_score.weight"
    assert torch.equal(log["init"][trained], saved["model"][trained])
    assert not torch.equal(log["init"][trained], saved["ema_state"]["state"][trained])
    expected = saved["model"][trained]
    for i in range(3):
        expected = 0.6 * expected + 0.4 * log[i]["model"][trained]
    assert torch.allclose(trainer.ema_state.state[trained], expected, atol=1e-6)
    # The averages are near the fine-tuned weights: closer than a fresh model's initialisation.
    final = log[2]["model"][trained]
    fresh = EMAState().copy_from(train_net.Trainer.build_model(cfg)).state[trained]
    assert (trainer.ema_state.state[trained] - final).norm() < 0.5 * (fresh - final).norm()
    assert trainer.ema_state.num_updates == 3


def test_resume_without_an_ema_state_starts_at_the_resumed_weights(train_net, cfg_factory):
    """--resume from a checkpoint written without MODEL_EMA.ENABLED: the averages start at the
    resumed weights (a checkpoint's own EMA state, when it has one, wins: see the resume test)."""
    plain = cfg_factory("plain", **{"MODEL_EMA.ENABLED": False, "SOLVER.MAX_ITER": 2})
    _run(train_net, plain, {})
    cfg = cfg_factory("resume_plain", **{"SOLVER.MAX_ITER": 3})
    os.makedirs(cfg.OUTPUT_DIR)
    shutil.copy(os.path.join(plain.OUTPUT_DIR, "model_0000001.pth"), cfg.OUTPUT_DIR)
    with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    log = {}
    trainer = _run(train_net, cfg, log, resume=True)
    assert trainer.start_iter == 2
    resumed = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_0000001.pth"), weights_only=False)
    assert "ema_state" not in resumed
    trained = "head.cls_score.weight"
    assert torch.equal(log["init"][trained], resumed["model"][trained])
    expected = 0.6 * resumed["model"][trained] + 0.4 * log[2]["model"][trained]
    assert torch.allclose(trainer.ema_state.state[trained], expected, atol=1e-6)


def test_predictors_use_the_checkpoints_ema_weights(tmp_path):
    """GFLPredictor and TiledPredictor (demo, predict, SAHI) load the EMA weights of a checkpoint
    when MODEL_EMA.ENABLED and USE_EMA_WEIGHTS_FOR_EVAL_ONLY are set, the raw ones otherwise."""
    from detectron2.modeling import build_model as _build

    from gfocal.engine.hooks.ema import EMAState
    from gfocal.inference import TiledPredictor
    from gfocal.inference.predictor import GFLPredictor

    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = _build(cfg)
    ema = EMAState().copy_from(model)
    for name in ema.state:
        if ema.state[name].is_floating_point():
            ema.state[name] = ema.state[name] + 0.5  # averages that differ from the raw weights
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model": model.state_dict(), "ema_state": ema.state_dict()}, path)
    cfg.MODEL.WEIGHTS = path
    raw = model.head.cls_score.weight.detach()
    averaged = ema.state["head.cls_score.weight"]
    assert torch.equal(GFLPredictor(cfg).model.head.cls_score.weight, raw)
    cfg.MODEL_EMA.ENABLED = True
    cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY = True
    assert torch.equal(GFLPredictor(cfg).model.head.cls_score.weight, averaged)
    tiled = TiledPredictor(cfg, weights=path)
    assert torch.equal(tiled.model.head.cls_score.weight, averaged)
