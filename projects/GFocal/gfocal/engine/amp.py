"""Mixed-precision training on CPU: detectron2's AMPTrainer needs CUDA (float16 + GradScaler);
on CPU the step runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``, which keeps float32's
exponent range and so needs no loss scaling."""

import contextlib
import time
from unittest import mock

import torch

from detectron2.engine import SimpleTrainer

__all__ = ["AutocastTrainer", "cpu_amp_trainer"]


class AutocastTrainer(SimpleTrainer):
    """:class:`SimpleTrainer` whose forward pass (model and losses) runs under ``torch.autocast``;
    backward and the optimizer step run outside it, as in detectron2's AMPTrainer."""

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        device_type: str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__(model, data_loader, optimizer)
        self.device_type = device_type
        self.dtype = dtype

    def run_step(self):
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        if hasattr(self, "after_backward"):  # detectron2 after v0.6
            self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


@contextlib.contextmanager
def cpu_amp_trainer(cfg):
    """While building a ``DefaultTrainer`` with ``SOLVER.AMP.ENABLED`` and ``MODEL.DEVICE`` cpu,
    make it use :class:`AutocastTrainer` (bfloat16) instead of the CUDA-only AMPTrainer."""
    if not (cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu"):
        yield
        return
    with mock.patch("detectron2.engine.defaults.AMPTrainer", AutocastTrainer):
        yield
