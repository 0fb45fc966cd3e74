"""What DFL's bins must cover on a dataset: box sizes, and per FPN level the distances from the
ATSS-assigned anchor centers to the box edges in stride units (the targets y of Eq. 5-7, which
the model's ``losses`` clamps to ``[0, REG_MAX - 0.1]``: a clamped target's DFL pulls towards the
last bins instead of the true distance).

The assignment is the model's own (:func:`gfocal.modeling.atss.atss_assign` on the anchors of
``DefaultAnchorGenerator`` with ``MODEL.GFL.ANCHOR_SCALE`` / ``ANCHOR_OFFSET`` / ``TOPK``), on
the boxes as training sees them: cleaned by :mod:`gfocal.data.annotations` and resized like
``INPUT.MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN`` (every listed size for "choice", both ends for
"range"). Feature maps are ``ceil(padded size / stride)`` per level (the backbone's padding).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.data.transforms import ResizeShortestEdge
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import BoxMode

from ..modeling.atss import atss_assign
from .annotations import sanitize_annotations

__all__ = [
    "LevelStats",
    "analyze_boxes",
    "covering_reg_max",
    "level_strides",
    "plot_histograms",
    "recommend",
    "synthetic_coco_sized_records",
    "training_scales",
]

CLAMP_MARGIN = 0.1  # gfl.py clamps DFL targets to reg_max - 0.1


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


def _records_boxes(records: Sequence[dict], name: str, num_classes: int) -> List[Tuple[Tuple[int, int], np.ndarray]]:
    """((height, width), (G, 4) XYXY boxes) per image, with training's drop/clip rules."""
    cleaned, _ = sanitize_annotations(records, name, num_classes)
    out = []
    for record in cleaned:
        boxes = [
            BoxMode.convert(a["bbox"], a.get("bbox_mode", BoxMode.XYXY_ABS), BoxMode.XYXY_ABS)
            for a in record.get("annotations", [])
            if not a.get("iscrowd", 0)
        ]
        out.append(((record["height"], record["width"]), np.asarray(boxes, dtype=np.float64).reshape(-1, 4)))
    return out


class _Anchors:
    """The model's anchors for a padded image size, cached per size."""

    def __init__(self, strides: Sequence[int], anchor_scale: float, offset: float, size_divisibility: int):
        self.strides = list(strides)
        self.size_divisibility = max(size_divisibility, 1)
        self.generator = DefaultAnchorGenerator(
            sizes=[[anchor_scale * s] for s in self.strides], aspect_ratios=[1.0],
            strides=self.strides, offset=offset,
        )
        self._cache: Dict[Tuple[int, int], Tuple[torch.Tensor, List[int]]] = {}

    def __call__(self, height: int, width: int) -> Tuple[torch.Tensor, List[int]]:
        d = self.size_divisibility
        padded = (-(-height // d) * d, -(-width // d) * d)
        if padded not in self._cache:
            features = [torch.empty(1, 0, -(-padded[0] // s), -(-padded[1] // s)) for s in self.strides]
            anchors = self.generator(features)
            self._cache[padded] = (torch.cat([a.tensor for a in anchors]), [len(a) for a in anchors])
        return self._cache[padded]


def analyze_boxes(
    images: Sequence[Tuple[Tuple[int, int], np.ndarray]],
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
            anchors, num_per_level = anchors_for(new_h, new_w)
            matched = atss_assign(anchors, num_per_level, gt[None], torch.ones(1, len(gt), dtype=torch.bool), topk)[0]
            counts["boxes"] += len(gt)
            counts["unassigned"] += len(gt) - int(torch.unique(matched[matched >= 0]).numel())
            start = 0
            for i, (n, stride) in enumerate(zip(num_per_level, strides)):
                level = matched[start:start + n]
                pos = torch.nonzero(level >= 0).squeeze(1)
                if len(pos):
                    a = anchors[start + pos]
                    centers = (a[:, :2] + a[:, 2:]) / 2
                    g = gt[level[pos]]
                    d = torch.cat([centers - g[:, :2], g[:, 2:] - centers], dim=1) / stride
                    per_level[i].append(d.flatten().numpy())
                start += n
    stats = [LevelStats(name, int(s), np.concatenate(d) if d else np.zeros(0))
             for name, s, d in zip(levels, strides, per_level)]
    return stats, counts


def covering_reg_max(stats: Sequence[LevelStats], max_clamped_fraction: float) -> int:
    """The smallest REG_MAX whose clamp (``REG_MAX - 0.1``) leaves at most that fraction of the
    edge targets of all levels above it."""
    d = np.concatenate([s.distances for s in stats]) if stats else np.zeros(0)
    if not len(d):
        return 1
    q = float(np.quantile(d, 1.0 - max_clamped_fraction, method="higher")) if max_clamped_fraction > 0 else float(d.max())
    return max(1, math.floor(q + CLAMP_MARGIN) + 1)


def recommend(
    stats: Sequence[LevelStats], reg_max: int, max_clamped_fraction: float = 0.001, min_level_share: float = 0.01
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
    if coarsest.distances.size and coarsest.clamped(reg_max) / coarsest.distances.size > max_clamped_fraction:
        if coarsest.name[:1] == "p" and coarsest.name[1:].isdigit() and levels[-1] == coarsest.name:
            levels.append(f"p{int(coarsest.name[1:]) + 1}")
    return {
        "reg_max": reg_max if clamped <= max_clamped_fraction * targets else cover,
        "covering_reg_max": cover,
        "clamped": clamped,
        "targets": targets,
        "clamped_fraction": clamped / targets,
        "in_features": levels,
    }


def plot_histograms(stats: Sequence[LevelStats], reg_max: int, path: str, title: str = "",
                    recommended: Optional[int] = None) -> None:
    """One histogram per level of the edge distances, with the clamp ``REG_MAX - 0.1``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max([reg_max + 1] + [float(s.distances.max()) + 1 for s in stats if s.distances.size])
    bins = np.arange(0, math.ceil(top) + 0.5, 0.5)
    fig, axes = plt.subplots(len(stats), 1, figsize=(7, 1.8 * len(stats) + 0.6), sharex=True, squeeze=False)
    for ax, s in zip(axes[:, 0], stats):
        ax.hist(s.distances, bins=bins, color="tab:blue")
        ax.axvline(reg_max - CLAMP_MARGIN, color="tab:red", label=f"clamp at REG_MAX {reg_max} - 0.1")
        if recommended is not None and recommended != reg_max:
            ax.axvline(recommended - CLAMP_MARGIN, color="tab:green", ls="--",
                       label=f"recommended REG_MAX {recommended}")
        ax.set_ylabel(f"{s.name} (/{s.stride})")
        ax.text(0.99, 0.8, f"{s.num_positives} positives, {s.clamped(reg_max)} clamped",
                transform=ax.transAxes, ha="right", fontsize=8)
    axes[0, 0].legend(fontsize=8, loc="upper center")
    axes[-1, 0].set_xlabel("distance from the anchor center to a box edge (stride units; DFL bins 0..REG_MAX)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def synthetic_coco_sized_records(num_images: int = 500, seed: int = 0, height: int = 480, width: int = 640) -> List[dict]:
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
        anns = [{"bbox": [float(a), float(b), float(a + c), float(b + d)], "bbox_mode": BoxMode.XYXY_ABS,
                 "category_id": 0, "iscrowd": 0} for a, b, c, d in zip(x0, y0, w, h)]
        records.append({"file_name": f"synthetic_{image_id}.jpg", "image_id": image_id,
                        "height": height, "width": width, "annotations": anns})
    return records


def box_size_stats(images: Sequence[Tuple[Tuple[int, int], np.ndarray]]) -> Dict[str, object]:
    """Counts and percentiles of box width, height and sqrt(area) in the original pixels."""
    boxes = np.concatenate([b for _, b in images]) if images else np.zeros((0, 4))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    out: Dict[str, object] = {"images": len(images), "boxes": int(len(boxes))}
    for key, values in (("width", w), ("height", h), ("sqrt_area", np.sqrt(w * h))):
        if len(values):
            out[key] = {f"p{q}": round(float(np.percentile(values, q)), 1) for q in (1, 50, 99)}
            out[key].update(min=round(float(values.min()), 1), max=round(float(values.max()), 1))
    return out


def _level_summary(stats: Sequence[LevelStats], reg_max: int) -> List[Dict[str, object]]:
    total = sum(s.num_positives for s in stats) or 1
    rows = []
    for s in stats:
        d = s.distances
        rows.append({
            "level": s.name, "stride": s.stride, "positives": s.num_positives,
            "share": round(s.num_positives / total, 4),
            **({f"p{q}": round(float(np.percentile(d, q)), 2) for q in (50, 99, 99.9)} if d.size else {}),
            "max": round(float(d.max()), 2) if d.size else None,
            "clamped": s.clamped(reg_max),
        })
    return rows


def analyze_dataset(
    images: Sequence[Tuple[Tuple[int, int], np.ndarray]],
    cfg,
    known_strides: Dict[str, int],
    size_divisibility: int,
    max_clamped_fraction: float = 0.001,
    min_level_share: float = 0.01,
) -> Tuple[Dict[str, object], List[LevelStats], List[LevelStats]]:
    """The report of ``tools/analyze_dataset.py`` for a YAML config: box sizes, per-level
    distances and clamps under the config, the recommendation, and the analysis repeated on the
    recommended levels with the recommended REG_MAX (returned with both levels' stats)."""
    gfl = cfg.MODEL.GFL
    scales, max_size = training_scales(cfg), cfg.INPUT.MAX_SIZE_TRAIN
    kwargs = dict(anchor_scale=gfl.ANCHOR_SCALE, anchor_offset=gfl.ANCHOR_OFFSET, topk=gfl.TOPK,
                  size_divisibility=size_divisibility)
    levels = list(gfl.IN_FEATURES)
    stats, counts = analyze_boxes(images, levels, level_strides(levels, known_strides), scales,
                                  max_size, **kwargs)
    rec = recommend(stats, gfl.REG_MAX, max_clamped_fraction, min_level_share)
    report: Dict[str, object] = {
        "box_sizes": box_size_stats(images),
        "training_scales": scales, "max_size": max_size,
        "config": {"REG_MAX": gfl.REG_MAX, "IN_FEATURES": levels, "TOPK": gfl.TOPK,
                   "ANCHOR_SCALE": gfl.ANCHOR_SCALE},
        "assignment": counts,
        "levels": _level_summary(stats, gfl.REG_MAX),
        "clamped": rec["clamped"], "targets": rec["targets"],
        "clamped_fraction": rec["clamped_fraction"],
        "covering_reg_max": rec["covering_reg_max"],
        "recommended": {"REG_MAX": rec["reg_max"], "IN_FEATURES": rec["in_features"]},
        "max_clamped_fraction": max_clamped_fraction, "min_level_share": min_level_share,
    }
    rec_stats = stats
    if rec["in_features"] != levels:
        rec_levels = rec["in_features"]
        rec_stats, rec_counts = analyze_boxes(
            images, rec_levels, level_strides(rec_levels, known_strides), scales, max_size, **kwargs)
        # REG_MAX on the recommended levels: the current one if it fits there, else covering.
        reg_max = recommend(rec_stats, gfl.REG_MAX, max_clamped_fraction, min_level_share)["reg_max"]
        check = {
            "in_features": rec_levels,
            "reg_max": reg_max,
            "levels": _level_summary(rec_stats, reg_max),
            "assignment": rec_counts,
            "clamped_fraction": recommend(rec_stats, reg_max)["clamped_fraction"],
        }
        # A level with few positives still adds ATSS candidates, which lower the IoU threshold
        # (mean + std) of the others: dropping it can leave boxes without any positive.
        check["accepted"] = rec_counts["unassigned"] <= counts["unassigned"]
        report["recommended_check"] = check
        if check["accepted"]:
            report["recommended"] = {"REG_MAX": reg_max, "IN_FEATURES": rec_levels}
        else:
            report["recommended"]["IN_FEATURES"] = levels
            rec_stats = stats
    return report, stats, rec_stats


def format_report(report: Dict[str, object], name: str) -> str:
    """The printed form of :func:`analyze_dataset`'s report."""
    sizes, cfg, rec = report["box_sizes"], report["config"], report["recommended"]
    lines = [f"Dataset {name}: {sizes['images']} images, {sizes['boxes']} boxes (after the drop/clip rules)"]
    for key in ("width", "height", "sqrt_area"):
        if key in sizes:
            lines.append(f"  box {key:9s} px: " + ", ".join(f"{k} {v}" for k, v in sizes[key].items()))
    lines.append(f"Training resize: short side {report['training_scales']}, long side <= {report['max_size']}; "
                 f"ATSS top-{cfg['TOPK']}, anchor {cfg['ANCHOR_SCALE']} x stride; "
                 f"{report['assignment']['unassigned']} of {report['assignment']['boxes']} boxes get no positive")

    def table(levels, reg_max):
        out = [f"  {'level':5s} {'stride':>6s} {'positives':>9s} {'share':>6s} {'p50':>6s} {'p99':>6s} "
               f"{'p99.9':>6s} {'max':>6s} {'> ' + str(reg_max) + '-0.1':>9s}"]
        for r in levels:
            out.append(f"  {r['level']:5s} {r['stride']:6d} {r['positives']:9d} {r['share']:6.1%} "
                       f"{r.get('p50', float('nan')):6.2f} {r.get('p99', float('nan')):6.2f} "
                       f"{r.get('p99.9', float('nan')):6.2f} {r['max'] or float('nan'):6.2f} {r['clamped']:9d}")
        return out

    lines.append(f"Edge distances of the positives in stride units (DFL bins 0..REG_MAX), "
                 f"IN_FEATURES {cfg['IN_FEATURES']}, REG_MAX {cfg['REG_MAX']}:")
    lines += table(report["levels"], cfg["REG_MAX"])
    lines.append(f"Clamped at REG_MAX - 0.1 = {cfg['REG_MAX'] - CLAMP_MARGIN:g}: {report['clamped']} of "
                 f"{report['targets']} edge targets ({report['clamped_fraction']:.3%}; a clamped target's DFL is wrong).")
    lines.append(f"Smallest REG_MAX clamping <= {report['max_clamped_fraction']:.1%}: {report['covering_reg_max']}")
    if "recommended_check" in report:
        check = report["recommended_check"]
        lines.append(f"Tried IN_FEATURES {check['in_features']} (boxes re-assigned), REG_MAX {check['reg_max']}:")
        lines += table(check["levels"], check["reg_max"])
        lines.append(f"  clamped {check['clamped_fraction']:.3%}; {check['assignment']['unassigned']} of "
                     f"{check['assignment']['boxes']} boxes get no positive (now "
                     f"{report['assignment']['unassigned']}): "
                     + ("recommended" if check["accepted"] else "rejected, the levels stay"))
    lines.append(f"Recommendation: MODEL.GFL.REG_MAX {rec['REG_MAX']}, MODEL.GFL.IN_FEATURES {rec['IN_FEATURES']}")
    return "\n".join(lines)
