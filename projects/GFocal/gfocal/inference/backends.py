"""Execution backends of the tiled predictor. Every backend runs the detector's own ``forward``
(:mod:`.forward`): preprocessing, anchors, decoding (Eq. 5), distribution voting, NMS and the
per-tile cap stay in PyTorch. ``onnxruntime`` and ``openvino`` run only the two fixed
convolution graphs of a dense detector, the **backbone** and the **head**, compiled once per
input shape (a tile size) and swapped into a shallow copy of the model.

Why not the whole exported model: the data-dependent part (top-k per level, NMS, voting) is a
small share of a tile's time (``benchmarks/tiled_predict.py --sections profile``), exports badly
(voting is not traceable; a graph traced on a tile without candidates breaks in ONNX Runtime)
and ran slower in OpenVINO than in eager PyTorch; the convolutions are where a runtime helps.
"""
import os
import tempfile
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from detectron2.structures import Instances

from .forward import run_detector

__all__ = ["BACKENDS", "INSTALL_COMMANDS", "check_backend", "has_dense_parts", "runtime_package",
           "build_backend", "TorchBackend", "RuntimeBackend", "CompiledModule"]

BACKENDS = ("torch", "onnxruntime", "openvino")
INSTALL_COMMANDS = {
    "onnxruntime": "pip install onnxruntime==1.31.1  (pinned in requirements.txt)",
    "openvino": "pip install openvino==2026.4.1  (pinned in requirements.txt)",
}
# The precisions each runtime runs the convolutions in (OpenVINO's INFERENCE_PRECISION_HINT).
RUNTIME_PRECISIONS = {"onnxruntime": {"fp32": None}, "openvino": {"fp32": "f32", "bf16": "bf16"}}


def runtime_package(backend: str):
    """The package of ``backend``; ImportError with its install command when it is missing."""
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


def has_dense_parts(model: nn.Module) -> bool:
    """Whether ``model`` has the ``backbone`` and ``head`` modules a runtime backend runs."""
    return all(isinstance(getattr(model, part, None), nn.Module) for part in ("backbone", "head"))


def check_backend(backend: str, model: nn.Module, precision: str, channels_last: bool) -> None:
    """Refuse an unknown backend, a missing package (with the install command) and options the
    runtime cannot run, each naming the flag."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r} must be one of {BACKENDS}")
    if backend == "torch":
        return
    runtime_package(backend)
    if precision not in RUNTIME_PRECISIONS[backend]:
        raise ValueError(f"--backend {backend} runs in {sorted(RUNTIME_PRECISIONS[backend])}: "
                         f"--precision {precision!r} is for --backend torch")
    if channels_last:
        raise ValueError(f"--backend {backend} chooses its own memory layout: --channels-last is "
                         "for --backend torch")
    if not has_dense_parts(model):
        raise ValueError(f"--backend {backend} runs a dense detector's backbone and head; "
                         f"{type(model).__name__} has no backbone and head modules")


class TorchBackend:
    """Eager PyTorch: the tiles of a batch in one forward pass of the model."""

    name = "torch"

    def __init__(self, model: nn.Module, precision: str = "fp32"):
        self.model, self.precision = model, precision

    def __call__(self, inputs: List[dict]) -> List[Instances]:
        return [out["instances"] for out in run_detector(self.model, inputs, self.precision)]


class _Flat(nn.Module):
    """``module`` with tensors in and a flat tuple of tensors out (what a runtime graph has);
    a list argument (the head's per-level features) is passed as separate tensors."""

    def __init__(self, module: nn.Module, as_list: bool):
        super().__init__()
        self.module, self.as_list = module, as_list

    def forward(self, *tensors: Tensor):
        out = self.module(list(tensors) if self.as_list else tensors[0])
        return tuple(t for t in pytree.tree_flatten(out)[0] if t is not None)


class CompiledModule(nn.Module):
    """A module (backbone or head) run by ONNX Runtime or OpenVINO on CPU, one static-shape
    graph per input shape, compiled at its first use. Same call and outputs (a dict of
    features, or the head's per-level lists) as the module it replaces, on CPU tensors."""

    def __init__(self, module: nn.Module, backend: str, precision: str = "fp32", threads: int = 0):
        super().__init__()
        self.backend, self.precision = backend, precision
        self.threads = threads or torch.get_num_threads()
        # not a submodule: the weights live in the runtime's graphs
        self.__dict__["source"] = module
        self._runners: Dict[tuple, Tuple[Callable, object]] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="gfocal_runtime_")
        if hasattr(module, "output_shape"):
            self.output_shape = module.output_shape
        for attr in ("size_divisibility", "padding_constraints"):
            if hasattr(module, attr):
                setattr(self, attr, getattr(module, attr))

    def _compile(self, tensors: List[Tensor], as_list: bool) -> Tuple[Callable, object]:
        flat = _Flat(self.source, as_list).eval()
        with torch.no_grad():
            leaves, spec = pytree.tree_flatten(self.source(list(tensors) if as_list else tensors[0]))
        spec = (spec, [leaf is None for leaf in leaves])  # a graph has no None outputs
        names = [f"input{i}" for i in range(len(tensors))]
        runtime = runtime_package(self.backend)
        # Through an ONNX file for both runtimes: OpenVINO's own PyTorch frontend crashed
        # (segmentation fault) converting detectron2's ResNet backbone.
        path = os.path.join(self._dir.name, f"graph{len(self._runners)}.onnx")
        with torch.no_grad():
            torch.onnx.export(flat, tuple(tensors), path, dynamo=False, opset_version=17,
                              input_names=names)
        if self.backend == "openvino":
            compiled = runtime.Core().compile_model(path, "CPU", {
                "INFERENCE_PRECISION_HINT": RUNTIME_PRECISIONS["openvino"][self.precision],
                "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"})
            request = compiled.create_infer_request()
            outputs = compiled.outputs

            def run(arrays):
                result = request.infer(dict(zip(names, arrays)))
                return [result[o] for o in outputs]
        else:
            options = runtime.SessionOptions()
            options.intra_op_num_threads = self.threads
            session = runtime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

            def run(arrays):
                return session.run(None, dict(zip(names, arrays)))
        return run, spec

    def forward(self, x):
        as_list = isinstance(x, (list, tuple))
        tensors = [t.detach().float().cpu().contiguous() for t in (x if as_list else [x])]
        key = tuple(tuple(t.shape) for t in tensors)
        if key not in self._runners:
            self._runners[key] = self._compile(tensors, as_list)
        run, (spec, empty) = self._runners[key]
        outputs = iter(run([t.numpy() for t in tensors]))
        leaves = [None if e else torch.from_numpy(np.asarray(next(outputs))) for e in empty]
        return pytree.tree_unflatten(leaves, spec)


class RuntimeBackend:
    """The detector's own forward with its backbone and head swapped, for the call, for their
    :class:`CompiledModule` (so the thresholds the predictor sets on the model apply)."""

    def __init__(self, model: nn.Module, backend: str, precision: str = "fp32"):
        self.name, self.model = backend, model
        self.modules = {part: CompiledModule(getattr(model, part), backend, precision)
                        for part in ("backbone", "head")}

    def __call__(self, inputs: List[dict]) -> List[Instances]:
        saved = {part: self.model._modules[part] for part in self.modules}
        self.model._modules.update(self.modules)
        try:
            return [out["instances"] for out in run_detector(self.model, inputs, "fp32")]
        finally:
            self.model._modules.update(saved)


def build_backend(backend: str, model: nn.Module, precision: str, channels_last: bool):
    """The backend ``backend`` for ``model`` (already in eval mode)."""
    check_backend(backend, model, precision, channels_last)
    if backend == "torch":
        return TorchBackend(model, precision)
    if next(model.parameters()).device.type != "cpu":
        raise ValueError(f"--backend {backend} runs on the CPU: set MODEL.DEVICE cpu "
                         "(or use --backend torch on a GPU)")
    return RuntimeBackend(model, backend, precision)
