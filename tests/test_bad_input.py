"""Bad annotations: each case is dropped with a logged count, clipped, or a clear error naming the
dataset, image id and annotation id; training on what is left never produces a NaN."""
import copy
import importlib.util
import logging
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

from conftest import REPO_ROOT, make_instances, tiny_cfg
from gfocal.data.annotations import load_train_dataset_dicts, sanitize_annotations


def _ann(bbox, ann_id, cls=0, mode=BoxMode.XYXY_ABS, **extra):
    return {"bbox": bbox, "bbox_mode": mode, "category_id": cls, "id": ann_id, **extra}


def _record(image_id, anns, h=64, w=80, file_name="img.png"):
    return {"file_name": file_name, "image_id": image_id, "height": h, "width": w, "annotations": anns}


BAD_CASES = [  # (annotation, expected outcome)
    (_ann([10, 10, 30, 40], 1), "kept"),
    (_ann([10, 10, 10, 40], 2), "empty"),  # zero width
    (_ann([10, 10, 20, -5], 3, mode=BoxMode.XYWH_ABS), "empty"),  # negative height
    (_ann([30, 10, 20, 40], 4), "empty"),  # x1 < x0
    (_ann([-10, 50, 30, 90], 5), "clipped"),  # partly outside (64 x 80 image)
    (_ann([100, 10, 130, 40], 6), "outside"),  # wholly outside
    (_ann([-30, -20, -1, -2], 7), "outside"),
    (_ann([float("nan"), 10, 30, 40], 8), "non-finite"),
    (_ann([0, 0, float("inf"), 40], 9), "non-finite"),
    (_ann([0, 0, 30, 40], 10, mode=BoxMode.XYWH_ABS, iscrowd=1), "crowd"),
]


def test_each_case_is_dropped_clipped_or_kept_and_counted(caplog):
    record = _record(7, [a for a, _ in BAD_CASES])
    original = copy.deepcopy(record)
    with caplog.at_level(logging.WARNING):
        (cleaned,), counts = sanitize_annotations([record], "toy", num_classes=3)
    assert record == original  # the input is not modified
    expected = {k: sum(o == k for _, o in BAD_CASES) for k in ("empty", "outside", "non-finite", "crowd")}
    assert {k: counts[k] for k in expected} == expected
    assert counts["clipped"] == 1 and counts["kept"] == 2
    assert [a["id"] for a in cleaned["annotations"]] == [1, 5]
    assert cleaned["annotations"][1]["bbox"] == [0.0, 50.0, 30.0, 64.0]
    assert all(a["bbox_mode"] == BoxMode.XYXY_ABS for a in cleaned["annotations"])
    assert "Dataset 'toy'" in caplog.text and "'non-finite': 2" in caplog.text
    assert "image id 7, annotation id 8" in caplog.text  # the first non-finite one


def test_without_the_rules_an_infinite_box_becomes_a_whole_image_box():
    """detectron2's mapper clips +-inf to the image border and keeps the box: a silent mis-label."""
    ann = _ann([-math.inf, 0, math.inf, 40], 1)
    instances = utils.annotations_to_instances(
        [utils.transform_instance_annotations(copy.deepcopy(ann), [], (64, 80))], (64, 80)
    )
    instances = utils.filter_empty_instances(instances)
    assert instances.gt_boxes.tensor.tolist() == [[0.0, 0.0, 80.0, 40.0]]
    (cleaned,), _ = sanitize_annotations([_record(1, [ann])], "toy", num_classes=3)
    assert cleaned["annotations"] == []


@pytest.mark.parametrize("cls", [3, -1, 1.0, "1", None])
def test_class_id_out_of_range_names_dataset_image_and_annotation(cls):
    record = _record(12, [_ann([1, 1, 9, 9], 1), _ann([1, 1, 9, 9], 99, cls=cls)])
    with pytest.raises(ValueError) as err:
        sanitize_annotations([record], "toy", num_classes=3)
    assert "dataset 'toy', image id 12, annotation id 99" in str(err.value)
    assert "[0, 2]" in str(err.value) and "MODEL.GFL.NUM_CLASSES=3" in str(err.value)


def test_annotation_without_id_is_named_by_index():
    record = _record(3, [_ann([1, 1, 9, 9], 1), {"bbox": [1, 2, 3], "bbox_mode": 0, "category_id": 0}])
    with pytest.raises(ValueError, match=r"image id 3, annotation id #1 \(no 'id' field\).*4 numbers"):
        sanitize_annotations([record], "toy", num_classes=3)


def test_relative_box_mode_is_an_error():
    record = _record(3, [_ann([0.1, 0.1, 0.5, 0.5], 4, mode=BoxMode.XYXY_REL)])
    with pytest.raises(ValueError, match="annotation id 4: bbox_mode"):
        sanitize_annotations([record], "toy", num_classes=3)


# --------------------------------------------------------------------------------------------
# Through the project's training data loader and the model
# --------------------------------------------------------------------------------------------
def _register_bad_dataset(folder) -> str:
    name = "reliability_bad_boxes"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        path = os.path.join(folder, f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path)
        records.append(_record(i, [a for a, _ in BAD_CASES], file_name=path))
    records.append(_record(3, [BAD_CASES[7][0], BAD_CASES[9][0]], file_name=records[0]["file_name"]))
    DatasetCatalog.register(name, lambda: copy.deepcopy(records))
    MetadataCatalog.get(name).thing_classes = ["a", "b", "c"]
    return name


def _trainer_cls():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO_ROOT, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Trainer


@pytest.mark.parametrize("filter_empty", [True, False])
def test_train_loader_cleans_and_training_stays_finite(tmp_path, filter_empty):
    name = _register_bad_dataset(str(tmp_path))
    cfg = tiny_cfg(**{
        "DATASETS.TRAIN": (name,), "DATALOADER.NUM_WORKERS": 0, "SOLVER.IMS_PER_BATCH": 2,
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS": filter_empty,
        "INPUT.MIN_SIZE_TRAIN": (64,), "INPUT.MAX_SIZE_TRAIN": 100,
    })
    dicts = load_train_dataset_dicts(cfg)
    # Image 3 has only a NaN box and a crowd box: removed when empty images are filtered.
    assert [d["image_id"] for d in dicts] == ([0, 1, 2] if filter_empty else [0, 1, 2, 3])
    batch = next(iter(_trainer_cls().build_train_loader(cfg)))
    for item in batch:
        boxes = item["instances"].gt_boxes.tensor
        assert torch.isfinite(boxes).all() and len(boxes) in (0, 2)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _train_step(model, inputs):
    with EventStorage():
        losses = model(inputs)
    total = sum(losses.values())
    total.backward()
    return losses


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    return model


@pytest.mark.parametrize("with_boxes", [True, False])
def test_images_without_boxes_train_as_all_negative(model, with_boxes, toy_image):
    model.zero_grad()
    empty = {"image": toy_image["image"], "instances": make_instances((128, 160), [], [])}
    inputs = [toy_image, empty] if with_boxes else [empty, empty]
    losses = _train_step(model, inputs)
    assert all(torch.isfinite(v) for v in losses.values())
    assert (losses["loss_box"] > 0) == with_boxes and losses["loss_cls"] > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_hundreds_of_boxes_train_finite(model):
    model.zero_grad()
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(400, 2, generator=g) * 240
    wh = 2 + torch.rand(400, 2, generator=g) * 40
    boxes = torch.cat([xy, (xy + wh).clamp(max=255)], dim=1)
    image = torch.rand(3, 256, 256, generator=g) * 255
    inputs = [{"image": image, "instances": make_instances((256, 256), boxes.tolist(), torch.randint(0, 3, (400,), generator=g).tolist())}]
    losses = _train_step(model, inputs)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
