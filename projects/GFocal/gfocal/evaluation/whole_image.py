"""Whole-image evaluation: the stitched predictions of each whole image against its whole-image
annotations (the tree community scores per image, not per tile): COCO AP (pycocotools, with a
detection cap above the number of crowns: its default 100 would cap recall on a 279-crown image)
and precision / recall / F1 at IoU 0.4 (:func:`precision_recall`)."""
import contextlib
import io
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from detectron2.evaluation import DatasetEvaluator


from .coco_metrics import METRIC_KEYS
from .precision_recall import best_f1_threshold, precision_recall

__all__ = ["TiledWholeImageEvaluator", "build_whole_image_evaluator", "coco_ap",
           "evaluate_whole_images", "tree_whole_images"]


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


class TiledWholeImageEvaluator(DatasetEvaluator):
    """Whole-image evaluation of a tiled dataset (``TEST.WHOLE_IMAGE.ENABLED``): each tile's
    detections are moved to its source image's pixels (the ``window`` of the tile in the COCO
    JSON of :func:`gfocal.data.tiles.write_tiles`), merged per source image by the seam rule and
    class-wise NMS (:func:`gfocal.inference.merge.merge_detections`, the tiled predictor's), and
    scored against the whole-image boxes: AP / AP50 / AP75 (class-agnostic, as
    :func:`coco_ap`), precision / recall / F1 at ``iou`` and ``score_thresh`` and the best-F1
    threshold. Results under the task ``whole_image``; ``whole_image.json`` in ``output_dir``."""

    def __init__(self, dataset_name: str, iou: float, score_thresh: float, nms_thresh: float,
                 max_dets: int = 10000, edge_margin: float = 2.0, output_dir: Optional[str] = None):
        import json

        from detectron2.data import MetadataCatalog

        meta = MetadataCatalog.get(dataset_name)
        json_file = meta.get("json_file", None)
        data = None
        if json_file and os.path.isfile(json_file):
            with open(json_file) as f:
                data = json.load(f)
        if not data or "sources" not in data:
            raise ValueError(
                f"TEST.WHOLE_IMAGE.ENABLED: dataset {dataset_name!r} is not a tiled dataset (no "
                "tile windows in its JSON); tile it with DATASETS.TILING.MODE grid, or turn "
                "TEST.WHOLE_IMAGE.ENABLED off"
            )
        self.name, self.iou, self.score_thresh = dataset_name, iou, score_thresh
        self.nms_thresh, self.max_dets, self.edge_margin = nms_thresh, max_dets, edge_margin
        self.output_dir = output_dir
        self._tiles = {im["id"]: (im["source"], im["window"]) for im in data["images"]}
        self._sources = data["sources"]
        tiling = data["info"]["tiling"]
        self._tile_size, self._overlap = tiling["tile_size"], tiling["overlap"]
        self.reset()

    def reset(self) -> None:
        self._dets: List[tuple] = []

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            self._dets.append((inp["image_id"], inst.pred_boxes.tensor.numpy(),
                               inst.scores.numpy(), inst.pred_classes.numpy()))

    def evaluate(self):
        import json
        from collections import OrderedDict

        import torch
        from detectron2.utils import comm

        from ..inference.merge import merge_detections
        from ..tiling import tile_grid

        dets = comm.gather(self._dets, dst=0)
        if not comm.is_main_process():
            return {}
        per_source: Dict[int, List[tuple]] = {}
        for image_id, boxes, scores, classes in (d for part in dets for d in part):
            source, window = self._tiles[image_id]
            per_source.setdefault(source, []).append((window, boxes, scores, classes))
        scored = []
        for source in self._sources:
            hw = (source["height"], source["width"])
            found = per_source.get(source["id"], [])
            b = [torch.as_tensor(bx, dtype=torch.float32) + torch.tensor(w[:2] * 2, dtype=torch.float32)
                 for w, bx, _, _ in found]
            win = [torch.tensor(w, dtype=torch.float32).expand(len(bx), 4) for w, bx, _, _ in found]
            if found and sum(len(x) for x in b):
                kept_b, kept_s, _, _ = merge_detections(
                    torch.cat(b), torch.cat([torch.as_tensor(s) for _, _, s, _ in found]).float(),
                    torch.cat([torch.as_tensor(c) for _, _, _, c in found]).long(), torch.cat(win),
                    torch.as_tensor(tile_grid(hw, self._tile_size, self._overlap), dtype=torch.float32),
                    hw, self.nms_thresh, self.max_dets, self.edge_margin)
            else:
                kept_b, kept_s = torch.zeros(0, 4), torch.zeros(0)
            gt = np.asarray(source["boxes"], dtype=np.float32).reshape(-1, 4)
            scored.append({"gt_boxes": gt, "gt_crowd": np.asarray(source["iscrowd"], dtype=bool),
                           "boxes": kept_b.numpy(), "scores": kept_s.numpy().astype(np.float64)})
        normal = [dict(s, gt_boxes=s["gt_boxes"][~s["gt_crowd"]]) for s in scored]
        res: Dict[str, object] = dict(coco_ap(normal, self.max_dets))
        at = precision_recall(scored, self.iou, self.score_thresh)
        best = best_f1_threshold(scored, self.iou)
        res.update({"precision": at["precision"], "recall": at["recall"], "f1": at["f1"],
                    "best_f1": best["f1"], "best_f1_score_thresh": best["score_thresh"],
                    "images": len(scored)})
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "whole_image.json"), "w") as f:
                json.dump({"dataset": self.name, "iou": self.iou, "score_thresh": self.score_thresh,
                           **res, "at_threshold": at, "best": best}, f, indent=1)
        return OrderedDict(whole_image={k: float(v) for k, v in res.items()})


def build_whole_image_evaluator(cfg, dataset_name: str, output_dir: Optional[str] = None):
    """:class:`TiledWholeImageEvaluator` for ``dataset_name`` when ``TEST.WHOLE_IMAGE.ENABLED``
    (IoU and score threshold of ``TEST.PRECISION_RECALL``), else None."""
    if cfg.TEST.get("WHOLE_IMAGE") is None or not cfg.TEST.WHOLE_IMAGE.ENABLED:
        return None
    pr, whole = cfg.TEST.PRECISION_RECALL, cfg.TEST.WHOLE_IMAGE
    return TiledWholeImageEvaluator(dataset_name, pr.IOU_THRESH, pr.SCORE_THRESH,
                                    cfg.MODEL.GFL.NMS_THRESH_TEST, whole.MAX_DETS,
                                    whole.EDGE_MARGIN, output_dir)
