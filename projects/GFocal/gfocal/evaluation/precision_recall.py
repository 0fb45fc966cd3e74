"""Precision and recall of detections at one IoU threshold and one score threshold.

The tree-crown community reports these at IoU 0.4 (DeepForest's evaluation) beside COCO AP. A
detection is a true positive if it is matched to a not yet matched ground-truth box with IoU at
or above the threshold, detections taken in decreasing score order per image (greedy, as COCO).
A detection that matches no normal box but overlaps an ``iscrowd`` region (a crown cut by the tile
border) at or above the threshold is ignored: neither a hit nor a false positive, as in COCO.
"""
import copy
import json
import logging
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = [
    "PrecisionRecallEvaluator",
    "best_f1_threshold",
    "match_detections",
    "precision_recall",
    "results_precision_recall",
    "score_iou_correlation",
]

logger = logging.getLogger(__name__)


def match_detections(
    gt_boxes: np.ndarray,
    gt_crowd: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    iou: float,
    return_ious: bool = False,
):
    """Greedy matching of one image's detections (XYXY, any order) in decreasing score order.

    Returns an int array per detection: 1 true positive, 0 false positive, -1 ignored (matched
    only a crowd region); with ``return_ious`` also the IoU of each true positive with its GT
    (0 elsewhere)."""
    order = np.argsort(-scores, kind="stable")
    outcome = np.zeros(len(boxes), dtype=np.int64)
    matched_iou = np.zeros(len(boxes), dtype=np.float64)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return (outcome, matched_iou) if return_ious else outcome
    ious = pairwise_iou(Boxes(torch.as_tensor(boxes[order])), Boxes(torch.as_tensor(gt_boxes))).numpy()
    taken = np.zeros(len(gt_boxes), dtype=bool)
    normal = ~gt_crowd
    for rank, det in enumerate(order):
        row = np.where(normal & ~taken, ious[rank], -1.0)
        best = int(row.argmax())
        if row[best] >= iou:
            taken[best] = True
            outcome[det] = 1
            matched_iou[det] = row[best]
        elif gt_crowd.any() and ious[rank][gt_crowd].max() >= iou:
            outcome[det] = -1
    return (outcome, matched_iou) if return_ious else outcome


def _counts(images: Sequence[dict], iou: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Scores, outcomes and matched IoUs of all detections, and the number of normal GT boxes."""
    all_scores, all_outcomes, all_ious, num_gt = [], [], [], 0
    for image in images:
        gt_crowd = np.asarray(image["gt_crowd"], dtype=bool).reshape(-1)
        num_gt += int((~gt_crowd).sum())
        scores = np.asarray(image["scores"], dtype=np.float64).reshape(-1)
        outcome, ious = match_detections(
            np.asarray(image["gt_boxes"], dtype=np.float32).reshape(-1, 4),
            gt_crowd,
            np.asarray(image["boxes"], dtype=np.float32).reshape(-1, 4),
            scores,
            iou,
            return_ious=True,
        )
        all_scores.append(scores)
        all_outcomes.append(outcome)
        all_ious.append(ious)
    if not all_scores:
        return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0), num_gt
    return np.concatenate(all_scores), np.concatenate(all_outcomes), np.concatenate(all_ious), num_gt


def _summary(
    scores: np.ndarray, outcome: np.ndarray, matched_ious: np.ndarray, num_gt: int, iou: float, score_thresh: float
) -> Dict[str, float]:
    """Counts at ``score_thresh`` from one greedy matching of all detections: matching in
    decreasing score order, dropping the detections below a threshold changes no match above it."""
    kept = scores >= score_thresh
    outcome, matched_ious = outcome[kept], matched_ious[kept]
    tp, fp = int((outcome == 1).sum()), int((outcome == 0).sum())
    hits = matched_ious[outcome == 1]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / num_gt if num_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1,
            "tp": tp, "fp": fp, "num_gt": num_gt, "score_thresh": score_thresh, "iou": iou,
            "median_hit_iou": float(np.median(hits)) if len(hits) else 0.0}


def precision_recall(images: Sequence[dict], iou: float = 0.4, score_thresh: float = 0.0) -> Dict[str, float]:
    """Precision, recall and F1 (in %) and the median IoU of the hits over images, each a dict
    with ``gt_boxes`` (G, 4) XYXY, ``gt_crowd`` (G,) bool, ``boxes`` (D, 4) XYXY and ``scores``
    (D,), counting the detections at or above ``score_thresh``."""
    return _summary(*_counts(images, iou), iou, score_thresh)


def best_f1_threshold(
    images: Sequence[dict], iou: float = 0.4, candidates: Sequence[float] = tuple(np.arange(0.05, 0.951, 0.05))
) -> Dict[str, float]:
    """The score threshold among ``candidates`` with the highest F1 (ties: the lower threshold),
    with its precision/recall (choose it on training images, apply it to validation)."""
    matching = _counts(images, iou)
    results = [_summary(*matching, iou, float(round(t, 4))) for t in candidates]
    return max(results, key=lambda r: (r["f1"], -r["score_thresh"]))


def _ground_truth(record: dict) -> Dict[str, np.ndarray]:
    """A dataset record's boxes (XYXY) and crowd flags, as :func:`precision_recall` takes them."""
    anns = record.get("annotations", [])
    gt = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
    return {
        "gt_boxes": np.asarray(gt, dtype=np.float32).reshape(-1, 4),
        "gt_crowd": np.asarray([a.get("iscrowd", 0) for a in anns], dtype=bool),
    }


def coco_images(dataset_name: str, detections: List[dict]) -> List[dict]:
    """Join a registered dataset's annotations with COCO-format detections (``image_id``,
    ``bbox`` XYWH, ``score``) into the per-image dicts of :func:`precision_recall`."""
    by_image: Dict[int, List[dict]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    images = []
    for record in DatasetCatalog.get(dataset_name):
        dets = by_image.get(record["image_id"], [])
        images.append({
            **_ground_truth(record),
            "boxes": np.asarray([BoxMode.convert(d["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
                                 for d in dets], dtype=np.float32).reshape(-1, 4),
            "scores": np.asarray([d["score"] for d in dets], dtype=np.float64),
        })
    return images


def results_precision_recall(
    dataset_name: str, results_json: str, iou: float, score_thresh: float
) -> Dict[str, float]:
    """:func:`precision_recall` of a COCOEvaluator results file (``coco_instances_results.json``)
    against the registered dataset it was computed on."""
    with PathManager.open(results_json) as f:
        detections = json.load(f)
    return precision_recall(coco_images(dataset_name, detections), iou, score_thresh)


class PrecisionRecallEvaluator(DatasetEvaluator):
    """detectron2 evaluator: precision/recall/F1 at IoU ``iou`` and score ``score_thresh``, and the
    best-F1 score threshold on this dataset (``TEST.PRECISION_RECALL``). Class-agnostic."""

    def __init__(self, dataset_name: str, iou: float = 0.4, score_thresh: float = 0.3, output_dir: str = ""):
        self.dataset_name = dataset_name
        self.iou = iou
        self.score_thresh = score_thresh
        self.output_dir = output_dir
        self._records = {r["image_id"]: r for r in DatasetCatalog.get(dataset_name)}
        self._images: List[dict] = []

    def reset(self) -> None:
        self._images = []

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            self._images.append({
                **_ground_truth(self._records[inp["image_id"]]),
                "boxes": inst.pred_boxes.tensor.numpy(),
                "scores": inst.scores.numpy().astype(np.float64),
            })

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        images = comm.gather(self._images, dst=0)
        if not comm.is_main_process():
            return {}
        images = [im for part in images for im in part]
        at = precision_recall(images, self.iou, self.score_thresh)
        best = best_f1_threshold(images, self.iou)
        result = {
            "precision": at["precision"], "recall": at["recall"], "f1": at["f1"],
            "score_thresh": self.score_thresh, "iou": self.iou,
            "best_f1": best["f1"], "best_f1_score_thresh": best["score_thresh"],
            "best_f1_precision": best["precision"], "best_f1_recall": best["recall"],
        }
        logger.info("Precision/recall on %s at IoU %.2f: %s", self.dataset_name, self.iou, result)
        if self.output_dir:
            PathManager.mkdirs(self.output_dir)
            with PathManager.open(os.path.join(self.output_dir, "precision_recall.json"), "w") as f:
                json.dump(result, f, indent=1)
        return {"pr": copy.deepcopy(result)}


def score_iou_correlation(images: Sequence[dict]) -> float:
    """Spearman rank correlation, over all detections of all images, between a detection's score
    and its best IoU with any normal (non-crowd) GT box: how well the scores rank the boxes by
    localisation quality (the property the joint score of QFL is trained for)."""
    scores, ious = [], []
    for image in images:
        boxes = np.asarray(image["boxes"], dtype=np.float32).reshape(-1, 4)
        gt = np.asarray(image["gt_boxes"], dtype=np.float32).reshape(-1, 4)
        gt = gt[~np.asarray(image["gt_crowd"], dtype=bool).reshape(-1)]
        if len(boxes) == 0:
            continue
        best = np.zeros(len(boxes))
        if len(gt):
            best = pairwise_iou(Boxes(torch.as_tensor(boxes)), Boxes(torch.as_tensor(gt))).numpy().max(axis=1)
        scores.append(np.asarray(image["scores"], dtype=np.float64).reshape(-1))
        ious.append(best)
    if not scores:
        return float("nan")
    s, i = np.concatenate(scores), np.concatenate(ious)
    if len(s) < 2:
        return float("nan")
    rank_s, rank_i = _ranks(s), _ranks(i)
    return float(np.corrcoef(rank_s, rank_i)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]
