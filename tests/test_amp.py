"""Mixed precision: the integral, QFL and DFL compute in float32 whatever their input dtype
(GFocal#9, mmdetection#9020: half-precision overflow and lost soft targets), a GFL training step
under CPU bfloat16 autocast gives finite float32 losses close to float32 training, and
SOLVER.AMP.ENABLED on CPU trains with :class:`gfocal.engine.amp.AutocastTrainer`."""

import copy

import detectron2.engine.defaults as d2_defaults
import torch
from torch.nn import functional as F

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from gfocal.engine.amp import AutocastTrainer, cpu_amp_trainer
from gfocal.modeling.integral import Integral
from gfocal.modeling.losses import distribution_focal_loss, quality_focal_loss

from conftest import make_instances, tiny_cfg


def test_integral_half_input_is_float32_and_exact():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 4 * 17, generator=g) * 3000).half()  # large, as fp16 heads can emit
    out = Integral(16)(logits)
    ref = (
        F.softmax(logits.double().view(64, 4, 17), -1) * torch.arange(17.0, dtype=torch.float64)
    ).sum(-1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_qfl_half_logits_keep_soft_targets():
    """Targets are IoUs such as 0.8437: in float16 they would round to 0.8438 (and in bfloat16 to
    0.8438), shifting the minimum of QFL; the loss must use them in float32."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(256, 8, generator=g) * 12).half()
    targets = torch.zeros(256, 8)
    targets[:, 3] = torch.rand(256, generator=g)
    out = quality_focal_loss(logits, targets)
    x, y = logits.double(), targets.double()
    ref = F.binary_cross_entropy_with_logits(x, y, reduction="none") * (y - x.sigmoid()).abs().pow(
        2
    )
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # The float32 target matters: the loss with float16-rounded targets differs measurably.
    rounded = quality_focal_loss(logits, targets.half())
    assert (rounded - out).abs().max() > 1e-5


def test_dfl_half_logits_no_overflow():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(128, 17, generator=g) * 2000).half()
    targets = torch.rand(128, generator=g) * 15.9
    out = distribution_focal_loss(logits, targets)
    logp = F.log_softmax(logits.double(), -1)
    left = targets.double().floor().long()
    ref = -(
        logp.gather(1, left[:, None]).squeeze(1) * (left + 1 - targets.double())
        + logp.gather(1, left[:, None] + 1).squeeze(1) * (targets.double() - left)
    )
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)


def _batch():
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 128, 160), generator=g).float()
    inst = make_instances(
        (128, 160), [[10, 20, 60, 70], [90, 60, 150, 120], [30, 30, 130, 100]], [0, 2, 1]
    )
    return [{"image": image, "instances": inst}]


def test_training_step_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    batch = _batch()
    head_dtypes = []
    model.head.register_forward_hook(lambda m, i, o: head_dtypes.append(o[0][0].dtype))
    with EventStorage():
        fp32 = {k: v.detach() for k, v in model(batch).items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(batch)
        sum(losses.values()).backward()
    assert head_dtypes == [torch.float32, torch.bfloat16]  # autocast really ran the head in bf16
    assert set(losses) == set(fp32) and {"loss_cls", "loss_box", "loss_dfl"} <= set(losses)
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        assert abs(value.item() - fp32[name].item()) <= 0.05 * abs(fp32[name].item()) + 1e-3, (
            name,
            value,
            fp32[name],
        )
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)


def test_autocast_trainer_runs_steps_in_bfloat16():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    before = copy.deepcopy(model.head.cls_score.weight.detach())
    head_dtypes = []
    model.head.register_forward_hook(lambda m, i, o: head_dtypes.append(o[0][0].dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = _batch()
    trainer = AutocastTrainer(model, iter([batch, batch]), optimizer)
    trainer.train(0, 2)
    assert head_dtypes == [torch.bfloat16, torch.bfloat16]
    assert not torch.equal(before, model.head.cls_score.weight.detach())
    assert torch.isfinite(model.head.cls_score.weight).all()


def test_amp_enabled_on_cpu_selects_autocast_trainer():
    cfg = tiny_cfg()
    cfg.SOLVER.AMP.ENABLED = True
    original = d2_defaults.AMPTrainer
    with cpu_amp_trainer(cfg):
        assert d2_defaults.AMPTrainer is AutocastTrainer
    assert d2_defaults.AMPTrainer is original
    cfg.SOLVER.AMP.ENABLED = False
    with cpu_amp_trainer(cfg):
        assert d2_defaults.AMPTrainer is original
