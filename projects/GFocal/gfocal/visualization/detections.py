"""Detections drawn over their ground truth with detectron2's Visualizer: ground-truth boxes
green (crowd / ignored ones grey), predictions red and labelled with their score."""
import os
from typing import Callable, List, Tuple

import numpy as np

__all__ = [
    "GT_COLOR", "IGNORED_COLOR", "PRED_COLOR", "draw_detections", "draw_dataset_predictions",
    "draw_dataset_results",
]

Color = Tuple[float, float, float]
GT_COLOR: Color = (0.1, 0.9, 0.1)  # green: ground-truth boxes
IGNORED_COLOR: Color = (0.6, 0.6, 0.6)  # grey: iscrowd boxes (e.g. cut by a tile border), ignored
PRED_COLOR: Color = (1.0, 0.1, 0.1)  # red: predictions, labelled with their score


def draw_detections(bgr: np.ndarray, record: dict, instances, metadata, scale: float = 1.5
                    ) -> np.ndarray:
    """``bgr`` (H, W, 3) with the boxes of the dataset ``record`` and the predicted ``instances``
    (pred_boxes, scores; on the CPU), as a BGR image ``scale`` times larger."""
    from detectron2.structures import BoxMode
    from detectron2.utils.visualizer import Visualizer

    vis = Visualizer(bgr[:, :, ::-1], metadata, scale=scale)
    anns = record.get("annotations", [])
    for crowd, color in ((0, GT_COLOR), (1, IGNORED_COLOR)):
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                 for a in anns if a.get("iscrowd", 0) == crowd]
        if boxes:
            vis.overlay_instances(boxes=boxes, assigned_colors=[color] * len(boxes), alpha=1.0)
    drawn = vis.overlay_instances(
        boxes=instances.pred_boxes.tensor.numpy(),
        labels=[f"{s:.2f}" for s in instances.scores.tolist()],
        assigned_colors=[PRED_COLOR] * len(instances),
        alpha=1.0,
    )
    return drawn.get_image()[:, :, ::-1]


def draw_dataset_predictions(predictor: Callable[[np.ndarray], dict], dataset: str, out_dir: str,
                             num: int, score_thresh: float) -> List[str]:
    """Run ``predictor`` (BGR image -> ``{"instances": ...}``, e.g. ``GFLPredictor``) on the first
    ``num`` images of the registered ``dataset`` and save each as ``out_dir/<image name>.png``
    with its ground truth and the predictions scoring at least ``score_thresh``; returns the
    paths."""
    return _draw_records(dataset, out_dir, num, score_thresh,
                         lambda record, bgr: predictor(bgr)["instances"].to("cpu"))


def draw_dataset_results(results_json: str, dataset: str, out_dir: str, num: int,
                         score_thresh: float) -> List[str]:
    """As :func:`draw_dataset_predictions`, with the detections an evaluation already wrote
    (COCOEvaluator's ``coco_instances_results.json`` of ``dataset``: XYWH boxes by image id)
    rather than running a model again."""
    import json

    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, Instances

    from ..evaluation.precision_recall import coco_images

    with open(results_json) as f:
        results = json.load(f)
    # coco_images groups the results by image and converts them to XYXY, in the dataset's order
    by_image = {record["image_id"]: image for record, image in
                zip(DatasetCatalog.get(dataset), coco_images(dataset, results))}

    def detections_of(record: dict, bgr: np.ndarray) -> Instances:
        image = by_image[record["image_id"]]
        inst = Instances(bgr.shape[:2])
        inst.pred_boxes = Boxes(torch.as_tensor(image["boxes"], dtype=torch.float32))
        inst.scores = torch.as_tensor(image["scores"], dtype=torch.float32)
        return inst

    return _draw_records(dataset, out_dir, num, score_thresh, detections_of)


def _draw_records(dataset: str, out_dir: str, num: int, score_thresh: float,
                  detections_of: Callable[[dict, np.ndarray], object]) -> List[str]:
    """The first ``num`` images of ``dataset`` drawn with ``detections_of(record, bgr)`` (those
    scoring at least ``score_thresh``); returns the PNG paths."""
    import cv2

    from detectron2.data import DatasetCatalog, MetadataCatalog

    metadata = MetadataCatalog.get(dataset)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for record in DatasetCatalog.get(dataset)[:num]:
        bgr = cv2.imread(record["file_name"])
        if bgr is None:
            raise FileNotFoundError(f"dataset {dataset!r}: cannot read image {record['file_name']}")
        instances = detections_of(record, bgr)
        instances = instances[instances.scores >= score_thresh]
        name = os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
        path = os.path.join(out_dir, name)
        cv2.imwrite(path, draw_detections(bgr, record, instances, metadata))
        paths.append(path)
    return paths
