"""Execution backends of the tiled predictor: eager PyTorch (the one forward path of
:mod:`.forward`), or ONNX Runtime / OpenVINO running the model exported by
:func:`gfocal.model_io.export.export_onnx` (the whole model: normalisation, backbone, head,
decoding, NMS, per-tile cap; thresholds fixed at export, one tile per run)."""
import os
import tempfile
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from detectron2.structures import Boxes, Instances

from .forward import run_detector

__all__ = ["BACKENDS", "INSTALL_COMMANDS", "check_backend", "build_backend", "TorchBackend",
           "ExportedBackend"]

BACKENDS = ("torch", "onnxruntime", "openvino")
INSTALL_COMMANDS = {
    "onnxruntime": "pip install onnxruntime==1.31.1  (pinned in requirements.txt)",
    "openvino": "pip install openvino==2026.4.1  (pinned in requirements.txt)",
}


def _module(backend: str):
    try:
        if backend == "onnxruntime":
            import onnxruntime

            return onnxruntime
        import openvino

        return openvino
    except ImportError as e:
        raise ImportError(
            f"--backend {backend}: the package is not installed ({e}); install it with "
            f"`{INSTALL_COMMANDS[backend]}`"
        ) from None


def check_backend(backend: str, model: nn.Module, precision: str, channels_last: bool) -> None:
    """Refuse an unknown backend, a missing package (with the install command) and options the
    exported graph cannot run, each naming the flag."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r} must be one of {BACKENDS}")
    if backend == "torch":
        return
    _module(backend)
    if precision != "fp32":
        raise ValueError(f"--backend {backend} runs the fp32 ONNX export: --precision "
                         f"{precision!r} is for --backend torch (use --precision fp32)")
    if channels_last:
        raise ValueError(f"--backend {backend} chooses its own memory layout: --channels-last is "
                         "for --backend torch")
    if getattr(model, "box_voting", None) is not None:
        raise ValueError(
            f"--backend {backend}: MODEL.GFL.BOX_VOTING.ENABLED=True, and distribution voting is "
            "not part of the exported graph; use --backend torch, or set "
            "MODEL.GFL.BOX_VOTING.ENABLED False"
        )


class TorchBackend:
    """Eager PyTorch: the tiles of a batch in one forward pass of the model."""

    name = "torch"

    def __init__(self, model: nn.Module, precision: str = "fp32"):
        self.model, self.precision = model, precision

    def __call__(self, inputs: List[dict]) -> List[Instances]:
        return [out["instances"] for out in run_detector(self.model, inputs, self.precision)]


class ExportedBackend:
    """ONNX Runtime or OpenVINO (CPU, fp32) on the model exported to ONNX at construction (traced
    on a ``sample_hw`` image; height and width stay dynamic). Detections equal eager PyTorch's
    up to float rounding (tests/test_tiled_predict.py checks >= 99% of boxes at IoU 0.9)."""

    def __init__(self, model: nn.Module, backend: str, sample_hw: Tuple[int, int],
                 threads: int = 0):
        from ..model_io.export import export_onnx

        self.name = backend
        self._dir = tempfile.TemporaryDirectory(prefix="gfocal_onnx_")
        self.path = os.path.join(self._dir.name, "model.onnx")
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        sample = torch.randint(0, 256, (3, *sample_hw), generator=g).float().to(device)
        export_onnx(model.cpu() if device.type != "cpu" else model, sample.cpu(), self.path)
        model.to(device)
        threads = threads or torch.get_num_threads()
        module = _module(backend)
        if backend == "onnxruntime":
            options = module.SessionOptions()
            options.intra_op_num_threads = threads
            self._session = module.InferenceSession(self.path, options,
                                                    providers=["CPUExecutionProvider"])
            self._run = lambda image: self._session.run(None, {"image": image})
        else:
            core = module.Core()
            # f32: OpenVINO would otherwise pick bf16 on CPUs that have it.
            compiled = core.compile_model(self.path, "CPU", {
                "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
            self._request = compiled.create_infer_request()
            self._run = lambda image: [
                self._request.infer({"image": image})[out] for out in compiled.outputs
            ]

    def __call__(self, inputs: Sequence[dict]) -> List[Instances]:
        results = []
        for inp in inputs:
            image = inp["image"].detach().cpu().float().numpy()
            boxes, classes, scores = (np.asarray(x) for x in self._run(image))
            inst = Instances((int(inp["height"]), int(inp["width"])))
            inst.pred_boxes = Boxes(torch.from_numpy(boxes.astype(np.float32)).reshape(-1, 4))
            inst.scores = torch.from_numpy(scores.astype(np.float32)).reshape(-1)
            inst.pred_classes = torch.from_numpy(classes.astype(np.int64)).reshape(-1)
            results.append(inst)
        return results


def build_backend(backend: str, model: nn.Module, precision: str, channels_last: bool,
                  sample_hw: Tuple[int, int]):
    """The backend ``backend`` for ``model`` (already in eval mode, thresholds set)."""
    check_backend(backend, model, precision, channels_last)
    if backend == "torch":
        return TorchBackend(model, precision)
    return ExportedBackend(model, backend, sample_hw)
