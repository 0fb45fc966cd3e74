"""The FAQ's onnxruntime recipe (docs/faq.md) on models exported by ``tools/export_model.py``: it
reads the channel order and test size from the model's metadata, and its detections match eager
PyTorch's (detectron2's ``DefaultPredictor`` on the same image, weights and config) for at least
99% of the boxes at IoU 0.9, on the tree model (RGB, 400 px) and on a BGR COCO config. The
exported graph also runs on an image without a single candidate box (no box, no error)."""
import os
import re
import runpy
import sys

import cv2
import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Boxes, pairwise_iou

from gfocal import add_gfl_config
from gfocal.data.tree_crowns import deepforest_data_dir

from conftest import CONFIG_DIR, REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import export_model  # noqa: E402

SCORE = 0.3  # the recipe's drawing threshold
TINY_COCO = [  # tests/conftest.py's tiny_cfg as config overrides
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "GN",
    "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.GFL.CONV_DIM", "64",
    "MODEL.GFL.NUM_CONVS", "2", "MODEL.GFL.NUM_CLASSES", "3", "MODEL.DEVICE", "cpu",
    "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "256",
]
CASES = {
    # name: (config, overrides, image (file, crop rows, crop cols), expected metadata)
    "trees_rgb_400": (
        "trees/gfl_lite0_trees.yaml",
        ["MODEL.GFL.BOX_VOTING.ENABLED", "False", "MODEL_EMA.ENABLED", "False",
         "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY", "False",
         "MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB", "0"],
        ("2019_YELL_2_541000_4977000_image_crop.png", slice(0, 400), slice(400, 800)),
        {"input_format": "RGB", "min_size_test": "400", "max_size_test": "400"},
    ),
    "coco_bgr": (
        "gfl_R_50_FPN_1x.yaml",
        TINY_COCO,
        ("OSBS_029.png", slice(40, 200), slice(0, 220)),
        {"input_format": "BGR", "min_size_test": "160", "max_size_test": "256"},
    ),
}


def faq_recipe() -> str:
    text = open(os.path.join(REPO_ROOT, "docs", "faq.md"), encoding="utf-8").read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "onnxruntime" in b]
    assert len(blocks) == 1, "docs/faq.md should hold one onnxruntime recipe"
    return blocks[0]


def _cfg(config: str, opts):
    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, config))
    cfg.merge_from_list(opts)
    return cfg


def _random_model(cfg) -> torch.nn.Module:
    """Random weights with spread-out scores, so that about a hundred boxes pass the recipe's
    0.3 and score ties (NMS order) do not occur."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.cls_score.weight, std=0.05)
        torch.nn.init.constant_(model.head.cls_score.bias, -0.5)
    return model


def match_fraction(a: Boxes, a_classes, b: Boxes, b_classes, iou: float = 0.9) -> float:
    """Share of the boxes of ``a`` that ``b`` has too: a box of the same class at IoU >= iou."""
    if len(a) == 0:
        return 1.0
    overlaps = pairwise_iou(a, b)
    overlaps[a_classes[:, None] != b_classes[None, :]] = 0
    return float((overlaps.max(dim=1).values >= iou).float().mean()) if len(b) else 0.0


@pytest.mark.parametrize("case", sorted(CASES))
def test_faq_recipe_matches_eager_detections(case, tmp_path):
    config, opts, (image_name, rows, cols), expected_meta = CASES[case]
    bgr = np.ascontiguousarray(cv2.imread(os.path.join(deepforest_data_dir(), image_name))[rows, cols])
    image_path = tmp_path / "image.png"
    cv2.imwrite(str(image_path), bgr)
    cfg = _cfg(config, opts)
    model = _random_model(cfg)
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)

    # Export with the documented tool (it also checks ONNX Runtime against eager on the sample).
    out = tmp_path / "export"
    export_model.main(["--config-file", os.path.join(CONFIG_DIR, config), "--format", "onnx",
                       "--sample-image", str(image_path), "--output", str(out)]
                      + opts + ["MODEL.WEIGHTS", str(weights)])
    import json

    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == expected_meta
    assert json.load(open(out / "model.json")) == dict(expected_meta, model="model.onnx")

    # The recipe, as written in the FAQ (numpy + onnxruntime + OpenCV).
    script = tmp_path / "run_onnx.py"
    script.write_text(faq_recipe())
    argv = sys.argv
    sys.argv = [str(script), str(out / "model.onnx"), str(image_path), str(tmp_path / "drawn.png")]
    try:
        ran = runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    ort_boxes, ort_classes = Boxes(torch.as_tensor(ran["boxes"], dtype=torch.float32)), torch.as_tensor(ran["classes"])
    ort_keep = torch.as_tensor(ran["keep"])
    drawn = cv2.imread(str(tmp_path / "drawn.png"))
    assert drawn.shape == bgr.shape and (drawn != bgr).any(), "no box was drawn"

    # Eager: detectron2's DefaultPredictor (its resize and channel order) with the same weights.
    cfg.MODEL.WEIGHTS = str(weights)
    predictor = DefaultPredictor(cfg)
    predictor.model = model  # the very module exported (DefaultPredictor loaded the same weights)
    with torch.no_grad():
        eager = predictor(bgr)["instances"]
    eager_keep = eager.scores >= SCORE
    assert int(eager_keep.sum()) >= 20, "too few boxes for a meaningful comparison"
    assert match_fraction(eager.pred_boxes[eager_keep], eager.pred_classes[eager_keep],
                          ort_boxes, ort_classes) >= 0.99
    assert match_fraction(ort_boxes[ort_keep], ort_classes[ort_keep],
                          eager.pred_boxes, eager.pred_classes) >= 0.99

    # An image without a single candidate above the threshold: the graph traced on the sample
    # (which has candidates) returns no box instead of failing (ONNX Runtime's ReduceSum of an
    # empty tensor, gfocal/modeling/integral.py). The class bias of the exported file is set so
    # low that no score passes.
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(out / "model.onnx"))
    biases = [t for t in proto.graph.initializer if t.name.endswith("cls_score.bias")]
    assert len(biases) == 1, [t.name for t in proto.graph.initializer][:20]
    biases[0].CopyFrom(numpy_helper.from_array(
        np.full(numpy_helper.to_array(biases[0]).shape, -30.0, np.float32), biases[0].name))
    onnx.save(proto, str(tmp_path / "no_candidates.onnx"))
    sys.argv = [str(script), str(tmp_path / "no_candidates.onnx"), str(image_path),
                str(tmp_path / "drawn_none.png")]
    try:
        empty = runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert empty["boxes"].shape == (0, 4) and len(empty["scores"]) == 0
    assert (cv2.imread(str(tmp_path / "drawn_none.png")) == bgr).all()

    # The comparison can fail: the other channel order gives other boxes.
    with torch.no_grad():
        swapped = predictor(np.ascontiguousarray(bgr[:, :, ::-1]))["instances"]
    assert match_fraction(swapped.pred_boxes[swapped.scores >= SCORE],
                          swapped.pred_classes[swapped.scores >= SCORE], ort_boxes, ort_classes) < 0.99
