"""docs/reliability.md: non-finite head outputs, bad images given to the predictors, image files
missing on disk."""
import os
import warnings

import cv2
import numpy as np
import pytest
import torch

from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from conftest import CONFIG_DIR, tiny_cfg
from gfocal.data.annotations import check_image_files, train_dataset_dicts
from gfocal.input_checks import check_bgr_image
from gfocal.inference.predictor import GFLPredictor, LazyPredictor


# --------------------------------------------------------------------------------------------
# Non-finite head outputs
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head_outputs():
    """A tiny model in eval mode and its inputs for forward_inference on a 128x160 image."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    image = torch.full((3, 128, 160), 40.0)
    image[:, 20:70, 10:60] = 220.0
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        logits, box_logits, quality = model.head(features)
    # Every anchor scores high: each level gives min(1000, anchors x classes) candidates.
    logits = [torch.full_like(x, 4.0) + torch.rand_like(x) for x in logits]
    return model, images, features, logits, box_logits, quality


def _infer(model, images, features, logits, box_logits, quality):
    with torch.no_grad():
        return model.forward_inference(images, features, (logits, box_logits, quality))[0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_box_outputs_are_dropped_and_counted(head_outputs, bad):
    model, images, features, logits, box_logits, quality = head_outputs
    broken = [x.clone() for x in box_logits]
    broken[0].fill_(bad)  # level P3: every candidate's box is non-finite
    num_level0 = min(model.test_topk_candidates, logits[0][0].numel())
    with pytest.warns(RuntimeWarning, match=f"dropped {num_level0} candidate boxes"):
        result = _infer(model, images, features, logits, broken, quality)
    assert len(result) and torch.isfinite(result.pred_boxes.tensor).all()
    # The same detections as without P3's candidates at all (their scores below threshold).
    no_level0 = [x.clone() for x in logits]
    no_level0[0].fill_(-30.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finite outputs: no warning
        expected = _infer(model, images, features, no_level0, box_logits, quality)
    assert torch.equal(result.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(result.scores, expected.scores)
    assert torch.equal(result.pred_classes, expected.pred_classes)


def test_all_infinite_features_give_no_detection_and_no_crash(head_outputs):
    """detectron2's test_model_e2e pattern for RetinaNet: inf features through the head."""
    model, images, features, _, _, _ = head_outputs
    inf_features = [torch.full_like(f, float("inf")) for f in features]
    with torch.no_grad():
        predictions = model.head(inf_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = _infer(model, images, inf_features, *predictions)
    assert torch.isfinite(result.pred_boxes.tensor).all()
    inf_boxes = [torch.full_like(x, float("inf")) for x in predictions[1]]
    with pytest.warns(RuntimeWarning, match="NaN or infinite coordinates"):
        result = _infer(model, images, features, head_outputs[3], inf_boxes, predictions[2])
    assert len(result) == 0


# --------------------------------------------------------------------------------------------
# Images given to the predictors
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yaml_cfg():
    cfg = tiny_cfg(**{"INPUT.MIN_SIZE_TEST": 96, "INPUT.MAX_SIZE_TEST": 128,
                      "MODEL.GFL.SCORE_THRESH_TEST": 0.0})
    cfg.freeze()
    return cfg


@pytest.fixture(scope="module")
def lazy_predictor():
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "trees", "gfl_lite0_trees.py"))
    cfg = LazyConfig.apply_overrides(cfg, [
        "train.device=cpu", "dataloader.test.mapper.augmentations.0.short_edge_length=96",
        "dataloader.test.mapper.augmentations.0.max_size=128",
    ])
    return LazyPredictor(cfg, checkpoint="")


def _bgr(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)


def test_check_bgr_image_names_each_problem():
    good = _bgr()
    check_bgr_image(good)
    check_bgr_image(good.astype(np.float32))
    cases = [
        (good[:, :, 0], ValueError, r"2-D \(H, W\) array.*COLOR_GRAY2BGR"),
        (np.dstack([good, good[:, :, :1]]), ValueError, r"shape \(90, 120, 4\)"),
        (good[:0], ValueError, "empty"),
        (good.tolist(), TypeError, "got a list"),
        (good.astype(np.complex64), TypeError, "dtype complex64"),
    ]
    for image, error, match in cases:
        with pytest.raises(error, match=match):
            check_bgr_image(image)
    for bad in (np.nan, np.inf):
        image = good.astype(np.float32)
        image[3, 4, 1] = bad
        with pytest.raises(ValueError, match="1 of the image's 32400 values are NaN or infinite"):
            check_bgr_image(image)


@pytest.fixture(scope="module")
def predictors(yaml_cfg, lazy_predictor):
    return {"GFLPredictor": GFLPredictor(yaml_cfg), "LazyPredictor": lazy_predictor,
            "DefaultPredictor": DefaultPredictor(yaml_cfg)}


def test_predictors_refuse_grey_and_non_finite_images(predictors):
    for name, predictor in predictors.items():
        image = _bgr().astype(np.float32)
        image[10:20, 10:20] = np.nan
        # detectron2's DefaultPredictor too, through the model's check (GFL.preprocess_image)
        with pytest.raises(ValueError, match="NaN or infinite"):
            predictor(image)
        image[10:20, 10:20] = np.inf
        with pytest.raises(ValueError, match="NaN or infinite"):
            predictor(image)
        if name != "DefaultPredictor":  # its own NumPy error comes before the model
            with pytest.raises(ValueError, match=r"2-D \(H, W\)"):
                predictor(cv2.cvtColor(_bgr(), cv2.COLOR_BGR2GRAY))


def test_predictors_warn_about_images_in_0_1(predictors):
    for predictor in predictors.values():
        with pytest.warns(UserWarning, match="looks scaled to \\[0, 1\\].*0-255"):
            predictor(_bgr().astype(np.float32) / 255.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            predictor(_bgr())  # 0-255: silent
            predictor(_bgr().astype(np.float32))


def test_gfl_predictor_gives_default_predictors_outputs(predictors):
    ours, theirs = predictors["GFLPredictor"], predictors["DefaultPredictor"]
    theirs.model.load_state_dict(ours.model.state_dict())
    a, b = ours(_bgr(1))["instances"], theirs(_bgr(1))["instances"]
    assert len(a) and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)


def test_model_pixel_mean_in_0_1_keeps_0_1_images_silent():
    cfg = tiny_cfg(**{"MODEL.PIXEL_MEAN": [0.4, 0.45, 0.5], "MODEL.PIXEL_STD": [0.2, 0.2, 0.2]})
    model = build_model(cfg).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", UserWarning)
        model([{"image": torch.rand(3, 64, 64)}])


# --------------------------------------------------------------------------------------------
# Image files missing on disk
# --------------------------------------------------------------------------------------------
def test_missing_image_files_are_named_before_training(tmp_path):
    present = tmp_path / "a.png"
    cv2.imwrite(str(present), _bgr())
    records = [{"file_name": str(present), "image_id": 0, "height": 90, "width": 120,
                "annotations": [{"bbox": [1, 1, 20, 20], "bbox_mode": 0, "category_id": 0}]}]
    check_image_files(records, "ok")
    missing = [str(tmp_path / f"gone_{i}.png") for i in range(8)]
    records += [dict(records[0], file_name=m, image_id=i + 1) for i, m in enumerate(missing)]
    records.append(dict(records[0], file_name="s3://bucket/remote.png", image_id=99))
    name = "reliability_missing_files"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [dict(r) for r in records])
        MetadataCatalog.get(name).thing_classes = ["a", "b", "c"]
    with pytest.raises(FileNotFoundError) as err:
        train_dataset_dicts([name], num_classes=3)
    message = str(err.value)
    assert f"'{name}': 8 of its 10 image files do not exist" in message
    assert all(m in message for m in missing[:5]) and missing[5] not in message
    assert "remote.png" not in message and str(present) not in message


def test_docs_python_example_compiles_and_imports():
    """The snippet of docs/reliability.md (it downloads a zoo model, so it is not run here)."""
    import ast

    with open(os.path.join(os.path.dirname(CONFIG_DIR), "docs", "reliability.md")) as f:
        code = f.read().split("```python\n")[1].split("```")[0]
    tree = ast.parse(code)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            module = __import__(node.module, fromlist=[a.name for a in node.names])
            assert all(hasattr(module, a.name) for a in node.names), node.module
