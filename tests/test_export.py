"""TorchScript and ONNX export of GFL (tracing through detectron2's TracingAdapter): the exported
models' detections match eager PyTorch's, also at an image size other than the traced one.

Tolerances (max absolute difference over all detections, float32 on CPU): TorchScript boxes
1e-4 px and scores 1e-6; ONNX Runtime boxes 1e-3 px and scores 1e-5. Counts and classes must
be equal."""

import importlib.util
import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from detectron2.modeling import build_model

from gfocal.model_io.export import compare_detections, export_onnx, export_torchscript, tracing_adapter
from gfocal.modeling.integral import Integral

from conftest import REPO_ROOT, tiny_cfg

TS_TOL = {"boxes": 1e-4, "scores": 1e-6}
ONNX_TOL = {"boxes": 1e-3, "scores": 1e-5}


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=g).float()


@pytest.fixture(scope="module")
def model():
    """A tiny GFL with heads spread so that scores differ and many pass the threshold."""
    torch.manual_seed(0)
    m = build_model(tiny_cfg()).eval()
    with torch.no_grad():
        nn.init.normal_(m.head.cls_score.weight, std=0.02)
        nn.init.constant_(m.head.cls_score.bias, -2.0)
        nn.init.normal_(m.head.box_pred.weight, std=0.05)
    return m


def _eager(model, image):
    with torch.no_grad():
        inst = model([{"image": image}])[0]["instances"]
    return inst.pred_boxes.tensor, inst.pred_classes, inst.scores


def _check(diff, tol):
    assert diff["count"] > 10, "too few detections for a meaningful comparison"
    assert diff["boxes"] <= tol["boxes"] and diff["scores"] <= tol["scores"], diff


@pytest.fixture(scope="module")
def images():
    return {"traced": _image(128, 160, 0), "other": _image(160, 224, 1)}


def test_torchscript_matches_eager(model, images, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ts") / "model.ts")
    export_torchscript(model, images["traced"], path)
    loaded = torch.jit.load(path)
    with torch.no_grad():
        for image in images.values():
            _check(compare_detections(_eager(model, image), loaded(image)), TS_TOL)


def test_onnx_matches_eager(model, images, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
    export_onnx(model, images["traced"], path)
    ops = _op_types(onnx.load(path).graph)
    assert "NonMaxSuppression" in ops and "TopK" in ops, ops
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for image in images.values():
        _check(
            compare_detections(_eager(model, image), session.run(None, {"image": image.numpy()})),
            ONNX_TOL,
        )


def _op_types(graph) -> set:
    """Op types of an ONNX graph, including those in subgraphs (If / Loop bodies)."""
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops |= _op_types(attr.g)
    return ops


def test_integral_exports_as_mul_and_reducesum(tmp_path):
    """The integral must not be a MatMul/Gemm with a 1-D weight (mmdeploy#120); ONNX Runtime's
    result equals PyTorch's."""
    integral = Integral(16).eval()
    logits = torch.randn(7, 4 * 17) * 5
    path = str(tmp_path / "integral.onnx")
    torch.onnx.export(integral, (logits,), path, dynamo=False, opset_version=17, input_names=["x"])
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"Softmax", "Mul", "ReduceSum"} <= ops, ops
    assert not ops & {"MatMul", "Gemm", "Einsum", "Conv"}, ops
    out = onnxruntime.InferenceSession(path).run(None, {"x": logits.numpy()})[0]
    np.testing.assert_allclose(out, integral(logits).numpy(), atol=1e-5)


def test_export_rejects_bad_input(model):
    with pytest.raises(ValueError, match="image"):
        tracing_adapter(model, torch.zeros(1, 3, 64, 64))
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            tracing_adapter(model, torch.zeros(3, 64, 64))
    finally:
        model.eval()


def _export_tool():
    spec = importlib.util.spec_from_file_location(
        "export_model", os.path.join(REPO_ROOT, "tools", "export_model.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool_argv(fmt: str, out: str):
    opts = [
        "MODEL.DEVICE",
        "cpu",
        "MODEL.WEIGHTS",
        "",
        "MODEL.RESNETS.DEPTH",
        "18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        "64",
        "MODEL.FPN.OUT_CHANNELS",
        "64",
        "MODEL.GFL.NUM_CONVS",
        "1",
        "MODEL.GFL.NUM_CLASSES",
        "2",
        "MODEL.GFL.PRIOR_PROB",
        "0.06",
    ]
    return [
        "--config-file",
        os.path.join(REPO_ROOT, "configs", "gfl_R_50_FPN_1x.yaml"),
        "--format",
        fmt,
        "--height",
        "64",
        "--width",
        "96",
        "--output",
        out,
    ] + opts


def test_export_tool_torchscript(tmp_path):
    result = _export_tool().main(_tool_argv("torchscript", str(tmp_path)))
    assert os.path.isfile(result["path"]) and result["count"] > 0
    assert result["boxes"] <= TS_TOL["boxes"]


def test_export_tool_missing_sample_image(tmp_path):
    argv = _tool_argv("onnx", str(tmp_path))
    argv[argv.index("--height") : argv.index("--height")] = [
        "--sample-image",
        str(tmp_path / "none.jpg"),
    ]
    with pytest.raises(SystemExit, match="no such file"):
        _export_tool().main(argv)


def test_export_tool_exports_the_evaluated_ema_weights(tmp_path):
    """MODEL_EMA.ENABLED + USE_EMA_WEIGHTS_FOR_EVAL_ONLY: the exported model holds the EMA
    averages, as evaluation and every predictor (gfocal/model_io/weights.py); else the raw ones."""
    from detectron2.config import get_cfg

    from gfocal import add_gfl_config
    from gfocal.engine.hooks.ema import EMAState

    argv = _tool_argv("torchscript", str(tmp_path / "ema"))
    opts = argv[argv.index("MODEL.DEVICE"):]
    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs", "gfl_R_50_FPN_1x.yaml"))
    cfg.merge_from_list(opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    ema = EMAState().copy_from(model)
    ema.state["head.cls_score.weight"] = ema.state["head.cls_score.weight"] + 0.5
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model": model.state_dict(), "ema_state": ema.state_dict()}, path)
    argv[argv.index("MODEL.WEIGHTS") + 1] = path
    tool = _export_tool()
    key = "model.head.cls_score.weight"
    with_ema = tool.main(argv + ["MODEL_EMA.ENABLED", "True",
                                 "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY", "True"])
    exported = torch.jit.load(with_ema["path"]).state_dict()[key]
    assert torch.equal(exported, ema.state["head.cls_score.weight"])
    raw_argv = list(argv)
    raw_argv[raw_argv.index("--output") + 1] = str(tmp_path / "raw")
    raw = torch.jit.load(tool.main(raw_argv)["path"]).state_dict()[key]
    assert torch.equal(raw, model.head.cls_score.weight.detach())
