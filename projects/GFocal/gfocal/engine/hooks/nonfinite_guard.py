"""Stop training at the first non-finite loss with an error that says where and what to try.

detectron2's ``SimpleTrainer`` raises ``FloatingPointError("Loss became infinite or NaN at
iteration=...")`` after the backward pass, on the main process only, without the lr or advice.
:class:`NonFiniteLossGuard` checks the model's loss dict right after the forward pass (a forward
hook: before the backward pass, the optimizer step and detectron2's check, on every worker) and
raises :class:`NonFiniteLossError` naming the iteration, every loss term, the lr and the last
checkpoint. The parameters are not updated by that iteration, and checkpoints written before it
stay as they were. A step whose losses are finite but whose gradients are not can still make the
parameters non-finite: before each periodic checkpoint the guard also checks the parameters and
refuses to let a non-finite model be saved over the last good one.
"""
import math
from typing import Dict, Optional

import torch

from detectron2.engine import HookBase

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "YAML_ADVICE", "LAZY_ADVICE"]

YAML_ADVICE = (
    "lower SOLVER.BASE_LR (the COCO configs assume 16 images per batch: keep "
    "SOLVER.REFERENCE_IMS_PER_BATCH 16 so that BASE_LR follows SOLVER.IMS_PER_BATCH, or divide it "
    "by 10), lengthen SOLVER.WARMUP_ITERS, set SOLVER.CLIP_GRADIENTS.ENABLED True, or check the "
    "boxes (tools/analyze_dataset.py)"
)
LAZY_ADVICE = (
    "lower optimizer.lr (set train.reference_batch_size=16 for the linear scaling rule, or divide "
    "it by 10), lengthen the lr_multiplier's warm-up, set optimizer.clip_gradients, or check the "
    "boxes (tools/analyze_dataset.py)"
)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite during training."""


class NonFiniteLossGuard(HookBase):
    """See the module doc. Register it before the ``PeriodicCheckpointer``. ``checkpointer``
    (default: the trainer's ``checkpointer`` attribute, as DefaultTrainer has) names the last
    checkpoint in the error."""

    def __init__(self, checkpoint_period: int = 0, advice: str = YAML_ADVICE, checkpointer=None):
        self.checkpoint_period = checkpoint_period
        self.advice = advice
        self.checkpointer = checkpointer
        self._handle = None

    def before_train(self):
        self._handle = self.trainer.model.register_forward_hook(self._check_losses)

    def after_train(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def after_step(self):
        next_iter = self.trainer.iter + 1
        saving = next_iter == self.trainer.max_iter or (
            self.checkpoint_period > 0 and next_iter % self.checkpoint_period == 0
        )
        if not saving:
            return
        bad = [n for n, p in self.trainer.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"Parameters became NaN or infinite at iteration {self.trainer.iter} (lr "
                f"{self._lr():g}; first: {bad[:3]}), with finite losses: the gradients were not. "
                f"Not saving this model.{self._last_checkpoint()} Try: {self.advice}."
            )

    # ----------------------------------------------------------------------------------------------
    def _check_losses(self, module, inputs, output) -> None:
        if not module.training or not isinstance(output, dict) or not output:
            return
        values = [v.detach().float().sum() for v in output.values() if torch.is_tensor(v)]
        if not values or bool(torch.isfinite(torch.stack(values)).all()):
            return
        raise NonFiniteLossError(self._message(output))

    def _lr(self) -> float:
        optimizer = getattr(self.trainer, "optimizer", None)
        if optimizer is None or not optimizer.param_groups:
            return math.nan
        return max(g["lr"] for g in optimizer.param_groups)

    def _last_checkpoint(self) -> str:
        checkpointer = self.checkpointer or getattr(self.trainer, "checkpointer", None)
        path = checkpointer.get_checkpoint_file() if checkpointer is not None else ""
        if not path:
            return " No checkpoint was written yet."
        return f" The last checkpoint, {path}, was written before this and is unaffected."

    def _message(self, losses: Dict[str, torch.Tensor]) -> str:
        terms = ", ".join(f"{k}={_value(v)}" for k, v in losses.items())
        return (
            f"Non-finite loss at iteration {self.trainer.iter} (lr {self._lr():g}): {terms}. "
            f"Training stopped before the parameters were updated.{self._last_checkpoint()} "
            f"Try: {self.advice}."
        )


def _value(v) -> Optional[str]:
    if not torch.is_tensor(v):
        return repr(v)
    v = v.detach().float()
    return f"{v.item():.4g}" if v.numel() == 1 else f"sum {v.sum().item():.4g}"
