"""What DFL's bins must cover on a dataset: box sizes, and per FPN level the distances from the
ATSS-assigned anchor centers to the box edges in stride units (the targets y of Eq. 5-7, which
the model's ``losses`` clamps to ``[0, REG_MAX - 0.1]``: a clamped target's DFL pulls towards the
last bins instead of the true distance).

The anchors, the assignment and the distances are the model's own code
(:mod:`gfocal.modeling.anchors` with ``MODEL.GFL.ANCHOR_SCALE`` / ``ANCHOR_OFFSET``,
:func:`gfocal.modeling.atss.atss_assign` with ``TOPK``, :func:`~gfocal.modeling.integral.boxes_to_distances`), on
the boxes as training sees them: cleaned by :mod:`gfocal.data.annotations` and resized like
``INPUT.MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN`` (every listed size for "choice", both ends for
"range"). Feature maps are ``ceil(padded size / stride)`` per level (the backbone's padding).
The report, its text and the histogram: :mod:`gfocal.data.analysis_report`.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.data.transforms import ResizeShortestEdge
from detectron2.structures import BoxMode

from ..modeling.anchors import flatten_anchors, gfl_anchor_generator, in_stride_units
from ..modeling.atss import atss_assign
from ..modeling.integral import boxes_to_distances
from ..modeling.losses import DFL_TARGET_MARGIN
from .annotations import sanitize_annotations

__all__ = [
    "LevelStats",
    "analyze_boxes",
    "covering_reg_max",
    "level_strides",
    "records_boxes",
    "recommend",
    "synthetic_coco_sized_records",
    "training_scales",
]

CLAMP_MARGIN = DFL_TARGET_MARGIN  # the model clamps DFL targets to reg_max - CLAMP_MARGIN


@dataclass
class LevelStats:
    """Edge distances (stride units) of the positives of one level."""

    name: str
    stride: int
    distances: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (4 * positives,)

    @property
    def num_positives(self) -> int:
        return len(self.distances) // 4

    def clamped(self, reg_max: int) -> int:
        return int((self.distances > reg_max - CLAMP_MARGIN).sum())


def level_strides(levels: Sequence[str], known: Optional[Dict[str, int]] = None) -> List[int]:
    """Strides of FPN levels: the backbone's (``known``), else 2**N for a level named ``pN``."""
    known = known or {}
    strides = []
    for name in levels:
        if name in known:
            strides.append(int(known[name]))
        elif name[:1] == "p" and name[1:].isdigit():
            strides.append(2 ** int(name[1:]))
        else:
            raise ValueError(f"level {name!r}: not produced by the backbone and not of the form pN")
    return strides


def training_scales(cfg) -> List[int]:
    """Short-side sizes of the training resize to analyse (all "choice" values, "range" ends)."""
    sizes = list(cfg.INPUT.MIN_SIZE_TRAIN)
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range":
        return sorted({min(sizes), max(sizes)})
    return sorted(set(sizes))


ImageBoxes = Tuple[Tuple[int, int], np.ndarray]  # ((height, width), (G, 4) XYXY boxes)


def records_boxes(records: Sequence[dict], name: str, num_classes: int) -> List[ImageBoxes]:
    """((height, width), (G, 4) XYXY boxes) per image, with training's drop/clip rules."""
    cleaned, _ = sanitize_annotations(records, name, num_classes)
    out = []
    for record in cleaned:
        boxes = [
            BoxMode.convert(a["bbox"], a.get("bbox_mode", BoxMode.XYXY_ABS), BoxMode.XYXY_ABS)
            for a in record.get("annotations", [])
            if not a.get("iscrowd", 0)
        ]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out.append(((record["height"], record["width"]), boxes))
    return out


class _Anchors:
    """The model's anchors for a padded image size, cached per size."""

    def __init__(
        self, strides: Sequence[int], anchor_scale: float, offset: float, size_divisibility: int
    ):
        self.strides = list(strides)
        self.size_divisibility = max(size_divisibility, 1)
        self.generator = gfl_anchor_generator(self.strides, anchor_scale, offset)
        self._cache: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor, List[int]]] = {}

    def with_strides(self, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """(R, 4) anchors, (R,) their strides and the anchors per level (:func:`flatten_anchors`)."""
        d = self.size_divisibility
        padded = (-(-height // d) * d, -(-width // d) * d)
        if padded not in self._cache:
            features = [
                torch.empty(1, 0, -(-padded[0] // s), -(-padded[1] // s)) for s in self.strides
            ]
            self._cache[padded] = flatten_anchors(self.generator(features), self.strides)
        return self._cache[padded]

    def __call__(self, height: int, width: int) -> Tuple[torch.Tensor, List[int]]:
        anchors, _, counts = self.with_strides(height, width)
        return anchors, counts


def analyze_boxes(
    images: Sequence[ImageBoxes],
    levels: Sequence[str],
    strides: Sequence[int],
    scales: Sequence[int],
    max_size: int,
    anchor_scale: float = 8.0,
    anchor_offset: float = 0.0,
    topk: int = 9,
    size_divisibility: int = 32,
) -> Tuple[List[LevelStats], Dict[str, float]]:
    """Per level the edge distances of the ATSS positives over ``images`` resized to each scale.

    Returns the per-level stats and counts: ``boxes`` (boxes x scales) and ``unassigned`` (boxes
    that got no positive anchor).
    """
    anchors_for = _Anchors(strides, anchor_scale, anchor_offset, size_divisibility)
    per_level: List[List[np.ndarray]] = [[] for _ in levels]
    counts = {"boxes": 0, "unassigned": 0}
    for scale in scales:
        for (height, width), boxes in images:
            if not len(boxes):
                continue
            new_h, new_w = ResizeShortestEdge.get_output_shape(height, width, scale, max_size)
            factor = np.array([new_w / width, new_h / height] * 2)
            gt = torch.as_tensor(boxes * factor, dtype=torch.float32)
            anchors, anchor_strides, num_per_level = anchors_for.with_strides(new_h, new_w)
            valid = torch.ones(1, len(gt), dtype=torch.bool)
            matched = atss_assign(anchors, num_per_level, gt[None], valid, topk)[0]
            counts["boxes"] += len(gt)
            counts["unassigned"] += len(gt) - int(torch.unique(matched[matched >= 0]).numel())
            # The DFL targets of the positives, as GFL._positives computes them.
            pos = torch.nonzero(matched >= 0).squeeze(1)
            centers, targets = in_stride_units(anchors[pos], anchor_strides[pos, None], gt[matched[pos]])
            distances = boxes_to_distances(centers, targets)
            counts_t = torch.tensor(num_per_level)
            level_of = torch.repeat_interleave(torch.arange(len(num_per_level)), counts_t)[pos]
            for i in range(len(levels)):
                if bool((level_of == i).any()):
                    per_level[i].append(distances[level_of == i].flatten().numpy())
    stats = [LevelStats(name, int(s), np.concatenate(d) if d else np.zeros(0))
             for name, s, d in zip(levels, strides, per_level)]
    return stats, counts


def covering_reg_max(stats: Sequence[LevelStats], max_clamped_fraction: float) -> int:
    """The smallest REG_MAX whose clamp (``REG_MAX - 0.1``) leaves at most that fraction of the
    edge targets of all levels above it."""
    d = np.concatenate([s.distances for s in stats]) if stats else np.zeros(0)
    if not len(d):
        return 1
    q = float(d.max())
    if max_clamped_fraction > 0:
        q = float(np.quantile(d, 1.0 - max_clamped_fraction, method="higher"))
    return max(1, math.floor(q + CLAMP_MARGIN) + 1)


def recommend(
    stats: Sequence[LevelStats],
    reg_max: int,
    max_clamped_fraction: float = 0.001,
    min_level_share: float = 0.01,
) -> Dict[str, object]:
    """REG_MAX and IN_FEATURES suggestions from one analysis.

    * ``reg_max``: the current value if it clamps at most ``max_clamped_fraction`` of the targets,
      else :func:`covering_reg_max` (the paper's COCO ablation, Table 2, found 14-16 best; larger
      values only add ``box_pred`` channels);
    * ``in_features``: the levels without the pyramid ends that get fewer than ``min_level_share``
      of the positives (re-run the analysis on them: their boxes move to the other levels), and
      a coarser level ``p{N+1}`` added when the coarsest one clamps more than the fraction.
    """
    total = sum(s.num_positives for s in stats) or 1
    targets = 4 * total
    clamped = sum(s.clamped(reg_max) for s in stats)
    cover = covering_reg_max(stats, max_clamped_fraction)
    keep = list(stats)
    while len(keep) > 1 and keep[0].num_positives / total < min_level_share:
        keep.pop(0)
    while len(keep) > 1 and keep[-1].num_positives / total < min_level_share:
        keep.pop()
    levels = [s.name for s in keep]
    coarsest = stats[-1]
    size = coarsest.distances.size
    if size and coarsest.clamped(reg_max) / size > max_clamped_fraction:
        name = coarsest.name
        if name[:1] == "p" and name[1:].isdigit() and levels[-1] == name:
            levels.append(f"p{int(name[1:]) + 1}")
    return {
        "reg_max": reg_max if clamped <= max_clamped_fraction * targets else cover,
        "covering_reg_max": cover,
        "clamped": clamped,
        "targets": targets,
        "clamped_fraction": clamped / targets,
        "in_features": levels,
    }


def synthetic_coco_sized_records(
    num_images: int = 500, seed: int = 0, height: int = 480, width: int = 640
) -> List[dict]:
    """Records with COCO's box statistics, without pixels: 640x480 images, 7 boxes each (COCO
    train2017: 7.3 per image), sqrt(area) log-normal with 41% below 32 px and 76% below 96 px
    (COCO's small / medium / large split 41 / 34 / 24 %), aspect ratios log-uniform in [1/3, 3]."""
    rng = np.random.default_rng(seed)
    z41, z76 = -0.2275, 0.7063  # standard normal quantiles of 0.41 and 0.76
    sigma = (math.log(96) - math.log(32)) / (z76 - z41)
    mu = math.log(32) - z41 * sigma
    records = []
    for image_id in range(1, num_images + 1):
        side = np.clip(rng.lognormal(mu, sigma, 7), 4, min(height, width))
        ratio = np.exp(rng.uniform(math.log(1 / 3), math.log(3), 7))
        w = np.minimum(side * np.sqrt(ratio), width)
        h = np.minimum(side / np.sqrt(ratio), height)
        x0 = rng.uniform(0, width - w)
        y0 = rng.uniform(0, height - h)
        anns = [
            {"bbox": [float(a), float(b), float(a + c), float(b + d)],
             "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 0}
            for a, b, c, d in zip(x0, y0, w, h)
        ]
        records.append({"file_name": f"synthetic_{image_id}.jpg", "image_id": image_id,
                        "height": height, "width": width, "annotations": anns})
    return records
