"""gfocal.visualization.draw_dataset_results: an evaluation's COCO results file drawn over the
ground truth gives the same picture as the predictor that produced those detections."""
import json

import cv2
import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from gfocal.visualization import draw_dataset_predictions, draw_dataset_results


def test_results_file_draws_as_the_predictor(tmp_path):
    image = np.full((80, 120, 3), 90, np.uint8)
    path = tmp_path / "tile.png"
    cv2.imwrite(str(path), image)
    record = {"file_name": str(path), "image_id": 7, "height": 80, "width": 120,
              "annotations": [{"bbox": [10, 10, 30, 30], "bbox_mode": BoxMode.XYXY_ABS,
                               "category_id": 0, "iscrowd": 0}]}
    name = "draw_results_test"
    DatasetCatalog.register(name, lambda: [record])
    MetadataCatalog.get(name).set(thing_classes=["tree"])
    try:
        boxes = [[50.0, 20.0, 90.0, 60.0], [5.0, 40.0, 25.0, 70.0]]  # XYXY
        scores = [0.9, 0.2]
        results = [{"image_id": 7, "category_id": 1, "score": s,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for b, s in zip(boxes, scores)]
        results.append({"image_id": 8, "category_id": 1, "score": 0.99, "bbox": [0, 0, 60, 60]})
        results_json = tmp_path / "coco_instances_results.json"
        results_json.write_text(json.dumps(results))

        def predictor(bgr):
            inst = Instances(bgr.shape[:2])
            inst.pred_boxes = Boxes(torch.tensor(boxes))
            inst.scores = torch.tensor(scores)
            return {"instances": inst}

        (a,) = draw_dataset_results(str(results_json), name, str(tmp_path / "a"), 5, 0.5)
        (b,) = draw_dataset_predictions(predictor, name, str(tmp_path / "b"), 5, 0.5)
        (c,) = draw_dataset_results(str(results_json), name, str(tmp_path / "c"), 5, 0.95)
        drawn, expected, none = (cv2.imread(p) for p in (a, b, c))
        np.testing.assert_array_equal(drawn, expected)
        assert not np.array_equal(drawn, none)  # the 0.9 box (only) is drawn at 0.5
        diff = np.abs(drawn.astype(int) - none.astype(int)).sum(axis=2) > 0
        ys, xs = np.nonzero(diff)  # where the 0.9 box was drawn: around (50, 20)-(90, 60) x 1.5
        assert 70 <= xs.min() and xs.max() <= 140 and 15 <= ys.min() and ys.max() <= 105
        # (the drawing is 1.5x the tile; the 0.2 box at x 7-37 is not drawn)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
