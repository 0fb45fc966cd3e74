"""The checked threshold API (gfocal/modeling/inference_thresholds.py)."""
import pytest
import torch

from detectron2.config import get_cfg

from gfocal import add_gfl_config
from gfocal.inference.test_time_augmentation import GFLWithTTA
from gfocal.modeling import get_inference_thresholds, inference_thresholds, set_inference_thresholds
from detectron2.modeling import build_model


@pytest.fixture(scope="module")
def model():
    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file("configs/trees/gfl_lite0_trees.yaml")
    cfg.MODEL.WEIGHTS = ""
    return build_model(cfg).eval()


def test_set_returns_previous_and_context_restores(model):
    before = get_inference_thresholds(model)
    assert set(before) == {"score_thresh", "nms_thresh", "topk_candidates", "max_detections"}
    with inference_thresholds(model, score_thresh=0.5, max_detections=7):
        assert model.test_score_thresh == 0.5 and model.max_detections_per_image == 7
        assert model.test_nms_thresh == before["nms_thresh"]
    assert get_inference_thresholds(model) == before
    previous = set_inference_thresholds(model, nms_thresh=0.3)
    assert previous == before and model.test_nms_thresh == 0.3
    set_inference_thresholds(model, **previous)


def test_reaches_through_wrappers_and_limits_outputs(model):
    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file("configs/trees/gfl_lite0_trees.yaml")
    tta = GFLWithTTA(cfg, model)
    image = torch.rand(3, 128, 128) * 255
    with inference_thresholds(tta, score_thresh=0.0, max_detections=3):
        assert model.max_detections_per_image == 3
        out = model([{"image": image}])[0]["instances"]
    assert len(out) <= 3


@pytest.mark.parametrize("kwargs", [{"score_thresh": 1.5}, {"nms_thresh": 0.0},
                                    {"max_detections": 0}, {"topk_candidates": 2.5}])
def test_bad_values_name_the_argument(model, kwargs):
    before = get_inference_thresholds(model)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        set_inference_thresholds(model, **kwargs)
    assert get_inference_thresholds(model) == before


def test_object_without_thresholds_is_a_type_error():
    with pytest.raises(TypeError, match="no inference thresholds"):
        set_inference_thresholds(torch.nn.Linear(2, 2), score_thresh=0.1)
