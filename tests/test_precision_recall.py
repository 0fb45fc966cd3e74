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
