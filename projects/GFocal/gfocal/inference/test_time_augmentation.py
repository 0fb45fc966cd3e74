"""Test-time augmentation for GFL (and other dense detectors that return ``Instances``), in the
conventions of detectron2's ``modeling/test_time_augmentation.py`` (which only accepts
GeneralizedRCNN): the keys ``TEST.AUG.ENABLED / MIN_SIZES / MAX_SIZE / FLIP``, plus
``TEST.AUG.DIHEDRAL`` (the 8 symmetries of the square: overhead imagery has no up) and
``TEST.AUG.MERGE`` ("nms": class-wise NMS of all versions' detections, as mmdetection's TTA;
"wbf": weighted box fusion, :func:`~gfocal.modeling.box_fusion.weighted_box_fusion`).

Every version is the image resized to one of ``MIN_SIZES`` (shortest edge, at most ``MAX_SIZE``)
and then flipped / transposed; its detections are mapped back to the input image exactly (flips
and transposes are exact, the resize is inverted by its scale factors).
"""
import copy
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.layers import batched_nms
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from ..data.augmentation import TransposeTransform
from ..modeling.box_fusion import weighted_box_fusion
from .forward import check_precision, run_detector

__all__ = [
    "DatasetMapperTTA", "GFLWithTTA", "TestTimeAugmentation", "dihedral_transforms", "MERGE_METHODS",
]

MERGE_METHODS = ("nms", "wbf")
WBF_DEFAULT_IOU = 0.55  # ensemble-boxes' default iou_thr
# model inputs (dicts with "image") -> their detections, one Instances each
Detector = Callable[[List[Dict]], List[Instances]]


def dihedral_transforms(height: int, width: int, flip: bool, dihedral: bool) -> List[T.Transform]:
    """Identity, then the horizontal flip (``flip``), or all 8 symmetries of the square
    (``dihedral``: both flips, their product and each of the four followed by a transpose)."""
    identity = T.NoOpTransform()
    hflip, vflip = T.HFlipTransform(width), T.VFlipTransform(height)
    if not dihedral:
        return [identity, hflip] if flip else [identity]
    flips = [identity, hflip, vflip, T.TransformList([hflip, vflip])]
    return flips + [T.TransformList([f, TransposeTransform()]) for f in flips]


class DatasetMapperTTA:
    """One dataset dict (with its model-input ``"image"`` tensor) -> the list of its augmented
    versions, each with ``"transforms"`` from the original image (``height`` x ``width``) to it."""

    def __init__(self, min_sizes, max_size: int, flip: bool, dihedral: bool = False):
        self.min_sizes = list(min_sizes)
        self.max_size = max_size
        self.flip = flip
        self.dihedral = dihedral
        if not self.min_sizes:
            raise ValueError("TEST.AUG.MIN_SIZES is empty: give at least one test size")

    @classmethod
    def from_config(cls, cfg) -> "DatasetMapperTTA":
        aug = cfg.TEST.AUG
        return cls(aug.MIN_SIZES, aug.MAX_SIZE, aug.FLIP, aug.DIHEDRAL)

    def __call__(self, dataset_dict: Dict) -> List[Dict]:
        image = dataset_dict["image"].permute(1, 2, 0).numpy()
        shape = image.shape[:2]
        orig = (dataset_dict.get("height", shape[0]), dataset_dict.get("width", shape[1]))
        pre = T.NoOpTransform() if shape == orig else T.ResizeTransform(*orig, *shape)
        out = []
        for size in self.min_sizes:
            resized, tfms = T.apply_augmentations([T.ResizeShortestEdge(size, self.max_size)], image)
            h, w = resized.shape[:2]
            for sym in dihedral_transforms(h, w, self.flip, self.dihedral):
                version = np.ascontiguousarray(sym.apply_image(resized))
                d = copy.copy(dataset_dict)
                d["image"] = torch.from_numpy(np.ascontiguousarray(version.transpose(2, 0, 1)))
                d["transforms"] = T.TransformList([pre, tfms, sym])
                d.pop("height", None)  # the model returns boxes in this version's pixels
                d.pop("width", None)
                out.append(d)
        return out


class TestTimeAugmentation:
    """The versions of each input (:class:`DatasetMapperTTA`) run by a detector and their
    detections merged back in the input's pixels (``TEST.AUG.MERGE``). Shared by
    :class:`GFLWithTTA` (evaluation, the model's own forward) and the tiled predictor (each tile,
    through its backend), so both merge alike."""

    @configurable
    def __init__(self, *, mapper: DatasetMapperTTA, merge: str = "nms", iou_thresh: float = 0.5,
                 max_detections: int = 100, batch_size: int = 4):
        if merge not in MERGE_METHODS:
            raise ValueError(f"TEST.AUG.MERGE={merge!r} is not one of {list(MERGE_METHODS)}")
        if not 0 < iou_thresh <= 1:
            raise ValueError(f"TEST.AUG.MERGE_IOU_THRESH={iou_thresh} must be <= 1 (<= 0: the default)")
        self.mapper, self.merge, self.iou_thresh = mapper, merge, float(iou_thresh)
        self.max_detections, self.batch_size = int(max_detections), int(batch_size)

    @classmethod
    def from_config(cls, cfg, model: Optional[nn.Module] = None, **kwargs):
        """``TEST.AUG.*``; the NMS merge's default IoU and the detections kept are ``model``'s
        (``MODEL.GFL.NMS_THRESH_TEST``, ``TEST.DETECTIONS_PER_IMAGE`` without one)."""
        merge, iou = cfg.TEST.AUG.MERGE, cfg.TEST.AUG.MERGE_IOU_THRESH  # checked by __init__
        nms = getattr(model, "test_nms_thresh", cfg.MODEL.GFL.NMS_THRESH_TEST)
        return {
            "mapper": DatasetMapperTTA.from_config(cfg),
            "merge": merge,
            "iou_thresh": iou if iou > 0 else (nms if merge == "nms" else WBF_DEFAULT_IOU),
            "max_detections": getattr(model, "max_detections_per_image", cfg.TEST.DETECTIONS_PER_IMAGE),
            **kwargs,
        }

    def _run(self, detector: Detector, versions: List[Dict]) -> List[Instances]:
        """``detector``'s detections of each version (in its own pixels), batching equal sizes."""
        outputs: List[Instances] = [None] * len(versions)
        by_shape: Dict[tuple, List[int]] = {}
        for i, x in enumerate(versions):
            by_shape.setdefault(tuple(x["image"].shape), []).append(i)
        for idxs in by_shape.values():
            for k in range(0, len(idxs), self.batch_size):
                chunk = idxs[k : k + self.batch_size]
                for i, inst in zip(chunk, detector([versions[i] for i in chunk])):
                    outputs[i] = inst
        return outputs

    def __call__(self, detector: Detector, inputs: List[Dict]) -> List[Instances]:
        """Each input's merged detections; ``detector`` maps model inputs to their Instances."""
        return [self._single(detector, x) for x in inputs]

    def _single(self, detector: Detector, x: Dict) -> Instances:
        versions = self.mapper(x)
        height, width = x["image"].shape[1:]
        orig = (x.get("height", height), x.get("width", width))
        boxes, scores, classes = [], [], []
        for version, inst in zip(versions, self._run(detector, versions)):
            b = inst.pred_boxes.tensor
            back = version["transforms"].inverse().apply_box(b.detach().cpu().numpy())
            boxes.append(torch.as_tensor(back, dtype=b.dtype, device=b.device).reshape(-1, 4))
            scores.append(inst.scores)
            classes.append(inst.pred_classes)
        boxes, scores, classes = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
        if self.merge == "nms":
            keep = batched_nms(boxes, scores, classes, self.iou_thresh)[: self.max_detections]
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        else:
            boxes, scores, classes = weighted_box_fusion(
                boxes, scores, classes, len(versions), self.iou_thresh
            )
            boxes, scores, classes = (t[: self.max_detections] for t in (boxes, scores, classes))
        result = Instances(orig)
        result.pred_boxes = Boxes(boxes)
        result.scores = scores
        result.pred_classes = classes
        # As the model's own postprocessing: clip to the image, drop empty boxes.
        return detector_postprocess(result, *orig)


class GFLWithTTA(nn.Module):
    """A dense detector with test-time augmentation: ``model(batched_inputs)`` as the wrapped
    model's, each image's detections merged from all its versions (:class:`TestTimeAugmentation`)."""

    def __init__(self, cfg, model: nn.Module, tta_mapper=None, batch_size: int = 4,
                 precision: str = "fp32"):
        super().__init__()
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model = model
        self.precision = check_precision(precision, "precision")
        mapper = {"mapper": tta_mapper} if tta_mapper is not None else {}
        self.tta = TestTimeAugmentation(cfg, model, batch_size=batch_size, **mapper)

    def _detect(self, inputs: List[Dict]) -> List[Instances]:
        return [out["instances"] for out in run_detector(self.model, inputs, self.precision)]

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict]:
        return [{"instances": inst} for inst in self.tta(self._detect, batched_inputs)]
