"""The one forward path of every predictor (GFLPredictor, LazyPredictor, TiledPredictor, the TTA
wrapper): the detector's own ``forward`` in eval mode without autograd, with two options.

* ``precision="bf16"``: the forward runs under CPU/CUDA autocast in bfloat16, so the backbone's
  and head's convolutions run in bf16; :meth:`GFL.forward_inference` leaves the autocast region
  and decodes boxes, runs NMS and voting in float32 (bf16 keeps 8 significant bits: pixel
  coordinates would be off by several pixels).
* ``channels_last``: weights stored NHWC (:func:`prepare_model`); convolutions given NHWC weights
  produce NHWC outputs, which oneDNN (CPU) and cuDNN run faster on recent hardware.

Nothing here re-implements ``DenseDetector.forward``: preprocessing, backbone, head, decoding
and postprocessing are the model's.
"""
import contextlib
from typing import Dict, List

import torch
from torch import nn

__all__ = ["PRECISIONS", "check_precision", "prepare_model", "run_detector", "model_device"]

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, flag: str = "--precision") -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{flag} {precision!r} must be one of {PRECISIONS}")
    return precision


def model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def prepare_model(model: nn.Module, channels_last: bool = False) -> nn.Module:
    """``model`` in eval mode (which also bypasses the training feature cache), with NHWC weights
    when ``channels_last``."""
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def autocast(model: nn.Module, precision: str):
    """The autocast region of ``precision`` on the model's device (none for fp32)."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=torch.bfloat16)


@torch.no_grad()
def run_detector(model: nn.Module, inputs: List[Dict], precision: str = "fp32") -> List[Dict]:
    """``model(inputs)`` (detectron2's list of input dicts in, ``[{"instances": ...}]`` out) in
    ``precision``. Predictors put the model in eval mode first (:func:`prepare_model`)."""
    with autocast(model, precision):
        return model(inputs)
