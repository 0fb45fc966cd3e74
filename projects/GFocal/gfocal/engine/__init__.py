"""Training: the trainer, its hooks, CPU autocast, batch scaling of the solver, the optimizer and
multi-process launch (GPUs through detectron2, CPU workers through gloo)."""
from .launch import cpu_ddp, launch
from .trainer import Trainer

__all__ = ["Trainer", "cpu_ddp", "launch"]
