"""Export a GFL model to TorchScript (tracing) and ONNX through detectron2's TracingAdapter, and
compare exported detections with eager ones. The input a runtime must feed the exported model
(channel order, test resize) is written beside it (``model.json``) and, for ONNX, into the
model's metadata (``export_metadata``)."""

import importlib
import json
import os
import sys
import types
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "tracing_adapter", "export_torchscript", "export_onnx", "compare_detections",
    "export_metadata", "write_metadata",
]

# Names of the outputs of the exported model, in order.
OUTPUT_NAMES = ("boxes", "classes", "scores")


def _detectron2_export():
    """``detectron2.export``. Its v0.6 ``__init__`` imports caffe2 unconditionally (upstream main
    made it optional); without caffe2 the package is loaded without its Caffe2 API."""
    try:
        return importlib.import_module("detectron2.export")
    except ImportError as e:
        if "caffe2" not in str(e):
            raise
    import detectron2

    package = types.ModuleType("detectron2.export")
    package.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
    sys.modules["detectron2.export"] = package
    package.TracingAdapter = importlib.import_module("detectron2.export.flatten").TracingAdapter
    torchscript = importlib.import_module("detectron2.export.torchscript")
    package.scripting_with_instances = torchscript.scripting_with_instances
    package.dump_torchscript_IR = torchscript.dump_torchscript_IR
    return package


def tracing_adapter(model: nn.Module, image: Tensor) -> nn.Module:
    """Wrap ``model`` (in eval mode) so that it takes one (3, H, W) image tensor and returns the
    tuple ``(boxes (K, 4), classes (K,), scores (K,))`` of its detections on that image."""
    if model.training:
        raise ValueError("export needs the model in eval mode (model.eval())")
    if getattr(model, "box_voting", None) is not None:
        raise ValueError(
            "MODEL.GFL.BOX_VOTING.ENABLED=True: distribution voting (gfocal/modeling/box_voting.py) "
            "is not part of the exported graph; export with MODEL.GFL.BOX_VOTING.ENABLED False"
        )
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one (3, H, W) image, got shape {tuple(image.shape)}")
    return _detectron2_export().TracingAdapter(model, [{"image": image}], _detections).eval()


def _detections(model: nn.Module, inputs: List[Dict[str, Tensor]]) -> Tuple[Tensor, Tensor, Tensor]:
    """Inference function of the adapter: the model's detections in a fixed order."""
    instances = model(inputs)[0]["instances"]
    return instances.pred_boxes.tensor, instances.pred_classes, instances.scores


def export_torchscript(model: nn.Module, image: Tensor, path: str) -> torch.jit.ScriptModule:
    """Trace ``model`` on ``image`` (backbone, head, decoding and NMS) and save it to ``path``."""
    adapter = tracing_adapter(model, image)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
    _makedirs(path)
    torch.jit.save(traced, path)
    return traced


def export_metadata(cfg) -> Dict[str, str]:
    """What feeds the exported model right: the config's ``INPUT.FORMAT`` (channel order of the
    (3, H, W) input, 0-255) and its test resize (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``:
    shortest edge to min, longest at most max, as detectron2's ``ResizeShortestEdge``)."""
    min_size = cfg.INPUT.MIN_SIZE_TEST
    if isinstance(min_size, (list, tuple)):
        min_size = min_size[0]
    return {
        "input_format": str(cfg.INPUT.FORMAT),
        "min_size_test": str(int(min_size)),
        "max_size_test": str(int(cfg.INPUT.MAX_SIZE_TEST)),
    }


def write_metadata(path: str, metadata: Dict[str, str]) -> str:
    """Write ``metadata`` beside the exported model ``path`` (``<folder>/model.json``) and, for an
    ``.onnx`` file, into its ``metadata_props`` (onnxruntime:
    ``session.get_modelmeta().custom_metadata_map``). Returns the JSON path."""
    if path.endswith(".onnx"):
        import onnx

        proto = onnx.load(path)
        del proto.metadata_props[:]
        for key, value in sorted(metadata.items()):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, path)
    json_path = os.path.join(os.path.dirname(os.path.abspath(path)), "model.json")
    with open(json_path, "w") as f:
        json.dump(dict(metadata, model=os.path.basename(path)), f, indent=1)
    return json_path


def export_onnx(
    model: nn.Module, image: Tensor, path: str, opset: int = 17, dynamic_size: bool = True,
    metadata: Optional[Dict[str, str]] = None,
) -> None:
    """Export ``model`` traced on ``image`` to ONNX at ``path`` (TorchScript-based exporter;
    torchvision registers NMS as ONNX ``NonMaxSuppression``). With ``dynamic_size`` the image
    height and width are dynamic axes; ``metadata`` (``export_metadata(cfg)``) is written into
    the model and beside it."""
    adapter = tracing_adapter(model, image)
    _makedirs(path)
    dynamic_axes = {"image": {1: "height", 2: "width"}} if dynamic_size else None
    with torch.no_grad():
        torch.onnx.export(
            adapter,
            (image,),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
        )
    if metadata:
        write_metadata(path, metadata)


def compare_detections(
    expected: Tuple[Tensor, Tensor, Tensor], actual: Sequence
) -> Dict[str, float]:
    """Max absolute differences between two sets of detections ``(boxes, classes, scores)``
    (tensors or numpy arrays); raises if their counts or classes differ."""
    exp = [np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x) for x in expected]
    act = [np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x) for x in actual]
    if len(act) != 3 or exp[0].shape != act[0].shape:
        raise AssertionError(
            f"detection counts differ: expected boxes {exp[0].shape}, got {[a.shape for a in act]}"
        )
    if not np.array_equal(exp[1], act[1]):
        raise AssertionError("detected classes differ")
    if exp[0].size == 0:
        return {"boxes": 0.0, "scores": 0.0, "count": 0}
    return {
        "boxes": float(np.abs(exp[0] - act[0]).max()),
        "scores": float(np.abs(exp[2] - act[2]).max()),
        "count": int(exp[0].shape[0]),
    }


def _makedirs(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
