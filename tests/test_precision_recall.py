"""Precision/recall at IoU 0.4 (gfocal/evaluation/precision_recall.py) on constructed cases."""
import numpy as np
import pytest

from gfocal.evaluation import best_f1_threshold, precision_recall
from gfocal.evaluation.precision_recall import match_detections


def image(gt, dets, scores, crowd=None):
    return {
        "gt_boxes": np.asarray(gt, dtype=np.float32).reshape(-1, 4),
        "gt_crowd": np.asarray(crowd if crowd is not None else [0] * len(gt), dtype=bool),
        "boxes": np.asarray(dets, dtype=np.float32).reshape(-1, 4),
        "scores": np.asarray(scores, dtype=np.float64),
    }


def test_match_iou_threshold_and_greedy_order():
    gt = np.array([[0, 0, 10, 10]], dtype=np.float32)
    # IoU of [0,0,10,5] with the GT is 0.5 (>= 0.4); of [0,0,10,3] 0.3 (< 0.4).
    dets = np.array([[0, 0, 10, 3], [0, 0, 10, 5]], dtype=np.float32)
    assert match_detections(gt, np.zeros(1, bool), dets, np.array([0.9, 0.8]), 0.4).tolist() == [0, 1]
    # Two detections hit the same GT: only the higher score counts, the other is a false positive.
    dets = np.array([[0, 0, 10, 10], [0, 0, 10, 9]], dtype=np.float32)
    assert match_detections(gt, np.zeros(1, bool), dets, np.array([0.2, 0.7]), 0.4).tolist() == [0, 1]


def test_crowd_regions_are_ignored_not_false_positives():
    gt = [[0, 0, 10, 10], [50, 50, 60, 60]]
    dets = [[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110]]
    r = precision_recall([image(gt, dets, [0.9, 0.9, 0.9], crowd=[0, 1])], iou=0.4)
    # 1 hit, 1 ignored (on the crowd box), 1 false positive; 1 normal GT.
    assert (r["tp"], r["fp"], r["num_gt"]) == (1, 1, 1)
    assert r["precision"] == pytest.approx(50.0) and r["recall"] == pytest.approx(100.0)


def test_precision_recall_counts_and_threshold():
    gt = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]
    dets = [[0, 0, 10, 10], [20, 0, 30, 10], [70, 0, 80, 10]]
    im = image(gt, dets, [0.9, 0.4, 0.6])
    r = precision_recall([im], iou=0.4, score_thresh=0.0)
    assert (r["tp"], r["fp"]) == (2, 1)
    assert r["precision"] == pytest.approx(200 / 3) and r["recall"] == pytest.approx(200 / 3)
    r = precision_recall([im], iou=0.4, score_thresh=0.5)  # keeps 0.9 (hit) and 0.6 (miss)
    assert (r["tp"], r["fp"]) == (1, 1)
    # F1 per threshold: 0.05-0.4 -> 2/3; 0.45-0.6 -> 0.4; 0.65-0.9 -> 0.5. Best: the lowest, 0.05.
    best = best_f1_threshold([im], iou=0.4)
    assert best["score_thresh"] == pytest.approx(0.05) and best["f1"] == pytest.approx(200 / 3)
    # Without the low-score hit, cutting the false positive at 0.6 is best: F1 = 2*1*(1/3)/(4/3).
    im2 = image(gt, dets[:1] + dets[2:], [0.9, 0.6])
    best = best_f1_threshold([im2], iou=0.4)
    assert best["score_thresh"] == pytest.approx(0.65) and best["f1"] == pytest.approx(50.0)


def test_no_detections_and_no_gt():
    r = precision_recall([image([[0, 0, 10, 10]], [], [])])
    assert (r["precision"], r["recall"], r["f1"]) == (0.0, 0.0, 0.0)
    r = precision_recall([image([], [[0, 0, 5, 5]], [0.9])])
    assert (r["tp"], r["fp"], r["num_gt"]) == (0, 1, 0)


def test_config_keys_add_the_evaluator_to_train_net(tmp_path):
    import sys

    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import DatasetEvaluators
    from detectron2.structures import BoxMode, Boxes, Instances

    from conftest import REPO_ROOT, tiny_cfg
    from gfocal.evaluation import PrecisionRecallEvaluator

    sys.path.insert(0, REPO_ROOT)
    from gfocal.engine import Trainer

    name = "pr_test_two_boxes"
    if name not in DatasetCatalog.list():
        annotations = [
            {"bbox": [0, 0, 10, 10], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},
            {"bbox": [20, 0, 30, 10], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},
        ]
        DatasetCatalog.register(
            name, lambda: [{"file_name": "x.png", "image_id": 7, "height": 40, "width": 40,
                            "annotations": annotations}]
        )
        MetadataCatalog.get(name).set(thing_classes=["tree"])
    cfg = tiny_cfg()
    cfg.TEST.PRECISION_RECALL.ENABLED = True
    cfg.TEST.PRECISION_RECALL.IOU_THRESH = 0.5
    cfg.TEST.PRECISION_RECALL.SCORE_THRESH = 0.5
    evaluator = Trainer.build_evaluator(cfg, name, output_folder=str(tmp_path))
    assert isinstance(evaluator, DatasetEvaluators)
    pr = [e for e in evaluator._evaluators if isinstance(e, PrecisionRecallEvaluator)]
    assert len(pr) == 1 and (pr[0].iou, pr[0].score_thresh) == (0.5, 0.5)

    inst = Instances((40, 40))
    # A hit (IoU 1), a box of IoU 0.45 with the second GT (a miss at IoU 0.5), a low-score hit.
    inst.pred_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 4.5], [20, 0, 30, 10]]))
    inst.scores = torch.tensor([0.9, 0.8, 0.3])
    inst.pred_classes = torch.zeros(3, dtype=torch.long)
    pr[0].reset()
    pr[0].process([{"image_id": 7}], [{"instances": inst}])
    result = pr[0].evaluate()["pr"]
    assert result["precision"] == pytest.approx(50.0) and result["recall"] == pytest.approx(50.0)
    # Keeping the 0.3 detection finds the second crown: best F1 at the lowest threshold.
    assert result["best_f1_score_thresh"] == pytest.approx(0.05)
    assert result["best_f1_recall"] == pytest.approx(100.0)
    assert (tmp_path / "precision_recall.json").is_file()

    cfg.TEST.PRECISION_RECALL.ENABLED = False
    assert not isinstance(Trainer.build_evaluator(cfg, name, output_folder=str(tmp_path)), DatasetEvaluators)


def test_median_iou_of_the_hits():
    gt = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]
    # IoUs 1.0, 0.5 and 0.8 with their GTs; one miss far away (not a hit, not counted).
    dets = [[0, 0, 10, 10], [20, 0, 30, 5], [40, 0, 50, 8], [90, 90, 99, 99]]
    r = precision_recall([image(gt, dets, [0.9, 0.8, 0.7, 0.6])], iou=0.4)
    assert r["tp"] == 3 and r["median_hit_iou"] == pytest.approx(0.8)


def test_score_iou_rank_correlation():
    from gfocal.evaluation.precision_recall import score_iou_correlation

    gt = [[0, 0, 10, 10]]
    dets = [[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 5], [0, 0, 10, 2]]  # IoU 1, .8, .5, .2
    assert score_iou_correlation([image(gt, dets, [0.9, 0.7, 0.5, 0.1])]) == pytest.approx(1.0)
    assert score_iou_correlation([image(gt, dets, [0.1, 0.5, 0.7, 0.9])]) == pytest.approx(-1.0)
    # Two swapped neighbours of four: Spearman 1 - 6 * 2 / (4 * 15) = 0.8.
    assert score_iou_correlation([image(gt, dets, [0.9, 0.5, 0.7, 0.1])]) == pytest.approx(0.8)
