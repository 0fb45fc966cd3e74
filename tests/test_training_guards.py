"""Small batches (the linear scaling rule, gfocal/engine/batch_scaling.py) and the stop at a non-finite loss
(gfocal/engine/hooks/nonfinite_guard.py): the error names iteration, loss terms and lr; the last checkpoint
written before it stays loadable and is never replaced by a non-finite model."""
import importlib.util
import math
import os

import pytest
import torch

from detectron2.config import LazyConfig
from detectron2.engine import HookBase, SimpleTrainer, hooks
from detectron2.modeling import build_model

from conftest import CONFIG_DIR, REPO_ROOT, tiny_cfg
from gfocal.engine.batch_scaling import scale_lazy_solver_to_batch, scale_solver_to_batch
from gfocal.model_io.checkpoint import GFLCheckpointer
from gfocal.engine.hooks.nonfinite_guard import NonFiniteLossError, NonFiniteLossGuard


# ------------------------------------------------------------------------------------------------
# Linear scaling rule
# ------------------------------------------------------------------------------------------------
def test_yaml_lr_and_warmup_follow_the_batch():
    cfg = tiny_cfg()  # configs/gfl_R_50_FPN_1x.yaml: 16 images, lr 0.01, 500 warm-up iterations
    assert cfg.SOLVER.REFERENCE_IMS_PER_BATCH == 16
    cfg.SOLVER.IMS_PER_BATCH = 4
    message = scale_solver_to_batch(cfg)
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.0025) and cfg.SOLVER.WARMUP_ITERS == 2000
    assert "SOLVER.BASE_LR 0.01 -> 0.0025, SOLVER.WARMUP_ITERS 500 -> 2000" in message
    # The dumped config (reference now 4) read again is not scaled twice.
    assert cfg.SOLVER.REFERENCE_IMS_PER_BATCH == 4
    assert scale_solver_to_batch(cfg) is None and cfg.SOLVER.BASE_LR == pytest.approx(0.0025)
    # 32 images: twice the lr, half the warm-up.
    cfg = tiny_cfg(**{"SOLVER.IMS_PER_BATCH": 32})
    scale_solver_to_batch(cfg)
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.02) and cfg.SOLVER.WARMUP_ITERS == 250


def test_yaml_rule_off_and_bad_values():
    cfg = tiny_cfg(**{"SOLVER.IMS_PER_BATCH": 4, "SOLVER.REFERENCE_IMS_PER_BATCH": 0})
    assert scale_solver_to_batch(cfg) is None and cfg.SOLVER.BASE_LR == 0.01
    trees = tiny_cfg("trees/gfl_lite0_trees.yaml")  # lr chosen at its own batch
    assert trees.SOLVER.REFERENCE_IMS_PER_BATCH == 0
    with pytest.raises(ValueError, match="SOLVER.REFERENCE_IMS_PER_BATCH=-4 must be an integer >= 0"):
        scale_solver_to_batch(tiny_cfg(**{"SOLVER.REFERENCE_IMS_PER_BATCH": -4}))


def test_train_net_applies_the_rule_once_and_logs_it(tmp_path):
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO_ROOT, "train_net.py"))
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    parser = train_net.default_argument_parser()
    opts = ["SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(tmp_path), "MODEL.DEVICE", "cpu"]
    cfg = train_net.setup(parser.parse_args(
        ["--config-file", os.path.join(CONFIG_DIR, "gfl_R_50_FPN_1x.yaml"), *opts]))
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.00125) and cfg.SOLVER.WARMUP_ITERS == 4000
    assert "Linear scaling rule" in (tmp_path / "log.txt").read_text()
    # Resuming from the written config.yaml keeps the scaled values.
    again = train_net.setup(parser.parse_args(["--config-file", str(tmp_path / "config.yaml"), *opts]))
    assert again.SOLVER.BASE_LR == pytest.approx(0.00125) and again.SOLVER.WARMUP_ITERS == 4000


def test_lazy_lr_and_warmup_follow_the_batch():
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "COCO-Detection", "gfl_R_50_FPN_1x.py"))
    cfg.dataloader.train.total_batch_size = 4
    warmup = cfg.lr_multiplier.warmup_length
    assert "optimizer.lr 0.01 -> 0.0025" in scale_lazy_solver_to_batch(cfg)
    assert cfg.optimizer.lr == pytest.approx(0.0025)
    assert cfg.lr_multiplier.warmup_length == pytest.approx(4 * warmup)
    assert scale_lazy_solver_to_batch(cfg) is None  # idempotent
    trees = LazyConfig.load(os.path.join(CONFIG_DIR, "trees", "gfl_lite0_trees.py"))
    assert scale_lazy_solver_to_batch(trees) is None and trees.optimizer.lr == 0.02


# ------------------------------------------------------------------------------------------------
# Non-finite loss
# ------------------------------------------------------------------------------------------------
class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return {"loss_a": (self.w * x).sum(), "loss_b": self.w.square().sum()}


def _data(bad_iter: int):
    i = 0
    while True:
        yield torch.full((3,), math.nan) if i == bad_iter else torch.ones(3)
        i += 1


def _trainer(model, data, tmp_path, extra=()):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleTrainer(model, data, optimizer)
    checkpointer = GFLCheckpointer(model, str(tmp_path))
    trainer.register_hooks([*extra, NonFiniteLossGuard(2, checkpointer=checkpointer),
                            hooks.PeriodicCheckpointer(checkpointer, 2)])
    return trainer


def test_nan_loss_stops_with_iteration_terms_lr_and_advice(tmp_path):
    model = Toy()
    trainer = _trainer(model, _data(bad_iter=3), tmp_path)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train(0, 10)
    message = str(err.value)
    assert "Non-finite loss at iteration 3 (lr 0.1): loss_a=nan, loss_b=" in message
    assert "model_0000001.pth" in message and "SOLVER.BASE_LR" in message
    assert "SOLVER.REFERENCE_IMS_PER_BATCH" in message
    assert isinstance(err.value, FloatingPointError)  # what detectron2 raises, with more said
    # Iteration 3 did not update the parameters; the checkpoint of iteration 1 loads.
    assert torch.isfinite(model.w).all()
    fresh = Toy()
    GFLCheckpointer(fresh).load(str(tmp_path / "model_0000001.pth"))
    after_two_steps = torch.ones(3)
    for _ in range(2):
        after_two_steps = after_two_steps - 0.1 * (1 + 2 * after_two_steps)
    assert torch.allclose(fresh.w, after_two_steps)


class Corrupt(HookBase):
    """Finite losses, non-finite parameters (what an infinite gradient does) at iteration 3."""

    def after_step(self):
        if self.trainer.iter == 3:
            with torch.no_grad():
                self.trainer.model.w[0] = math.inf


def test_non_finite_parameters_are_never_checkpointed(tmp_path):
    model = Toy()
    trainer = _trainer(model, _data(bad_iter=-1), tmp_path, extra=[Corrupt()])
    with pytest.raises(NonFiniteLossError, match=r"Parameters became NaN or infinite at iteration 3 .*\['w'\]"):
        trainer.train(0, 10)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    fresh = Toy()
    GFLCheckpointer(fresh).load(str(tmp_path / "model_0000001.pth"))
    assert torch.isfinite(fresh.w).all()


def test_gfl_with_a_nan_image_names_its_loss_terms(toy_image, tmp_path):
    """The real GFL loss dict: every term of the failing iteration is listed."""
    model = build_model(tiny_cfg())
    model.train()

    def data():
        yield [toy_image]
        # A diverged class conv from iteration 1 on (a NaN image is refused before the loss:
        # gfocal/input_checks.py).
        with torch.no_grad():
            model.head.cls_score.weight.fill_(math.nan)
        while True:
            yield [toy_image]

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = SimpleTrainer(model, data(), optimizer)
    trainer.register_hooks([NonFiniteLossGuard()])
    with pytest.raises(NonFiniteLossError, match=r"iteration 1 \(lr 0.01\): loss_cls=nan, loss_box=.*loss_dfl="):
        trainer.train(0, 5)
