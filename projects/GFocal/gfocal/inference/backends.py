"""Execution backends of the tiled predictor: eager PyTorch (the one forward path of
:mod:`.forward`), or ONNX Runtime / OpenVINO running the model exported by
:func:`gfocal.model_io.export.export_onnx` (the whole model: normalisation, backbone, head,
decoding, NMS, per-tile cap; thresholds fixed at export, one tile per run)."""
import os
import tempfile
from typing import Callable, Dict, List, Sequence, Tuple

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
    """ONNX Runtime or OpenVINO (CPU, fp32) on the model exported to ONNX, one export per tile
    size (the first at construction, for ``sample_hw``), with the model's thresholds at export
    time (the tiled predictor sets them around every call). Detections equal eager PyTorch's up
    to float rounding (tests/test_inference_backends.py: >= 99% of boxes at IoU 0.9).

    The exports have a static input size: OpenVINO 2026.4 gives other detections than ONNX
    Runtime and PyTorch for the export with dynamic height and width (checked on the tree model).
    """

    def __init__(self, model: nn.Module, backend: str, sample_hw: Tuple[int, int],
                 threads: int = 0):
        self.name, self.model = backend, model
        self.threads = threads or torch.get_num_threads()
        self._module = _module(backend)
        self._dir = tempfile.TemporaryDirectory(prefix="gfocal_onnx_")
        self._runners: Dict[Tuple[int, int], Callable] = {}
        self._runner(tuple(sample_hw))

    def _runner(self, hw: Tuple[int, int]) -> Callable:
        if hw in self._runners:
            return self._runners[hw]
        from ..model_io.export import export_onnx

        path = os.path.join(self._dir.name, f"model_{hw[0]}x{hw[1]}.onnx")
        device = next(self.model.parameters()).device
        g = torch.Generator().manual_seed(0)
        sample = torch.randint(0, 256, (3, *hw), generator=g).float()
        export_onnx(self.model.cpu(), sample, path, dynamic_size=False)
        self.model.to(device)
        if self.name == "onnxruntime":
            options = self._module.SessionOptions()
            options.intra_op_num_threads = self.threads
            session = self._module.InferenceSession(path, options,
                                                    providers=["CPUExecutionProvider"])
            run = lambda image: session.run(None, {"image": image})  # noqa: E731
        else:
            # f32: OpenVINO would otherwise pick bf16 on CPUs that have it.
            compiled = self._module.Core().compile_model(path, "CPU", {
                "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": self.threads})
            request = compiled.create_infer_request()
            run = lambda image: [request.infer({"image": image})[o]  # noqa: E731
                                 for o in compiled.outputs]
        self._runners[hw] = run
        return run

    def __call__(self, inputs: Sequence[dict]) -> List[Instances]:
        results = []
        for inp in inputs:
            image = inp["image"].detach().cpu().float().numpy()
            outputs = self._runner(tuple(image.shape[1:]))(image)
            boxes, classes, scores = (np.asarray(x) for x in outputs)
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
