"""Whole-image evaluation: the stitched predictions of each whole image against its whole-image
annotations (the tree community scores per image, not per tile): COCO AP (pycocotools, with a
detection cap above the number of crowns: its default 100 would cap recall on a 279-crown image)
and precision / recall / F1 at IoU 0.4 (:func:`precision_recall`)."""
import contextlib
import io
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from .coco_metrics import METRIC_KEYS
from .precision_recall import best_f1_threshold, precision_recall

__all__ = ["coco_ap", "evaluate_whole_images", "tree_whole_images"]


def tree_whole_images(split: str) -> Dict[str, object]:
    """The whole deepforest image of a tree-crown split and its (G, 4) XYXY VOC boxes."""
    import cv2

    from ..data.tree_crowns import TREE_SPLITS, deepforest_data_dir, read_voc_boxes

    path = os.path.join(deepforest_data_dir(), TREE_SPLITS[split])
    image = cv2.imread(path)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    boxes = read_voc_boxes(os.path.splitext(path)[0] + ".xml", image.shape[:2])
    return {"path": path, "gt_boxes": boxes.astype(np.float32)}


def coco_ap(images: Sequence[dict], max_dets: int = 10000) -> Dict[str, float]:
    """AP / AP50 / AP75 (in %) of per-image dicts (``gt_boxes``, ``boxes``, ``scores``, XYXY),
    one class, with up to ``max_dets`` detections per image."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    results = []
    for i, im in enumerate(images, start=1):
        gt["images"].append({"id": i, "width": 1, "height": 1})
        for b in np.asarray(im["gt_boxes"], dtype=np.float64).reshape(-1, 4):
            w, h = b[2] - b[0], b[3] - b[1]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": 1,
                                      "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
        for b, s in zip(np.asarray(im["boxes"], dtype=np.float64).reshape(-1, 4), im["scores"]):
            results.append({"image_id": i, "category_id": 1, "score": float(s),
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    if not results:
        return {k: 0.0 for k in METRIC_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    # COCOeval.summarize() reads its AP at a fixed maxDets of 100: read the precision array
    # (IoU x recall x class x area x maxDets) at all areas and the last cap instead.
    precision = ev.eval["precision"][:, :, 0, 0, -1]
    ious = list(np.round(ev.params.iouThrs, 2))

    def mean(p: np.ndarray) -> float:
        p = p[p > -1]
        return float(p.mean()) * 100 if p.size else 0.0

    return {"AP": mean(precision), "AP50": mean(precision[ious.index(0.5)]),
            "AP75": mean(precision[ious.index(0.75)])}


def evaluate_whole_images(
    predictor, images: Sequence[dict], iou: float = 0.4, score_thresh: Optional[float] = None
) -> Dict[str, object]:
    """Run a :class:`~gfocal.inference.TiledPredictor` on each whole image (``path``,
    ``gt_boxes``) and score the stitched detections: AP, and P/R/F1 at IoU ``iou`` at
    ``score_thresh`` (None: the best-F1 threshold on these images, reported as such)."""
    scored: List[dict] = []
    for image in images:
        inst = predictor(image["path"]).instances
        scored.append({
            "gt_boxes": image["gt_boxes"],
            "gt_crowd": np.zeros(len(image["gt_boxes"]), dtype=bool),
            "boxes": inst.pred_boxes.tensor.numpy(),
            "scores": inst.scores.numpy().astype(np.float64),
        })
    out: Dict[str, object] = dict(coco_ap(scored, predictor.max_dets))
    out["best_f1"] = best_f1_threshold(scored, iou)
    if score_thresh is not None:
        out["at_threshold"] = precision_recall(scored, iou, score_thresh)
    out["num_detections"] = int(sum(len(s["scores"]) for s in scored))
    out["images"] = [os.path.basename(im["path"]) for im in images]
    return out
