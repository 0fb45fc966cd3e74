"""The report of ``tools/analyze_dataset.py``: box sizes, the per-level DFL target distances of
:mod:`gfocal.data.analysis` under a YAML config, its recommendation checked by a second
assignment, the printed text and the histogram PNG."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.data.transforms import ResizeShortestEdge

from .analysis import (
    CLAMP_MARGIN,
    ImageBoxes,
    LevelStats,
    analyze_boxes,
    level_strides,
    recommend,
    training_scales,
)

__all__ = ["analyze_dataset", "box_size_stats", "format_report", "plot_histograms", "resize_check",
           "tile_image_boxes"]


def box_size_stats(images: Sequence[ImageBoxes]) -> Dict[str, object]:
    """Counts and percentiles of box width, height and sqrt(area) in the original pixels."""
    boxes = np.concatenate([b for _, b in images]) if images else np.zeros((0, 4))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    out: Dict[str, object] = {"images": len(images), "boxes": int(len(boxes))}
    for key, values in (("width", w), ("height", h), ("sqrt_area", np.sqrt(w * h))):
        if len(values):
            out[key] = {f"p{q}": round(float(np.percentile(values, q)), 1) for q in (1, 50, 99)}
            out[key].update(min=round(float(values.min()), 1), max=round(float(values.max()), 1))
    return out


def tile_image_boxes(images: Sequence[ImageBoxes], spec) -> List[ImageBoxes]:
    """The images cut by the grid of a :class:`gfocal.data.tiles.TilingSpec`: per window its
    size and its normal boxes (the box rule at the cuts; crowd boxes left out, as training)."""
    from ..tiling import tile_boxes, tile_grid

    out = []
    for (height, width), boxes in images:
        for window in tile_grid((height, width), spec.tile_size, spec.overlap):
            clipped, crowd = tile_boxes(boxes, window, spec.min_visible, spec.min_side)
            out.append(((int(window[3] - window[1]), int(window[2] - window[0])), clipped[~crowd]))
    return out


def resize_check(
    images: Sequence[ImageBoxes],
    cfg,
    known_strides: Optional[Dict[str, int]] = None,
    size_divisibility: Optional[int] = None,
) -> Dict[str, object]:
    """Box sizes after the training resize (at its smallest short side) against the smallest
    anchor (``MODEL.GFL.ANCHOR_SCALE`` x the finest stride), the boxes without a positive anchor,
    and a warning (``warning``, else None) when the resize shrinks the median box below the
    smallest anchor or more than ``DATASETS.TILING.WARN_UNASSIGNED_FRACTION`` of the boxes get
    no positive. The message says what to do: tile, or raise ``INPUT.MIN_SIZE_TRAIN``."""
    gfl = cfg.MODEL.GFL
    levels = list(gfl.IN_FEATURES)
    strides = level_strides(levels, known_strides)
    scales, max_size = training_scales(cfg), cfg.INPUT.MAX_SIZE_TRAIN
    sides, resized = [], []
    for (height, width), boxes in images:
        if not len(boxes):
            continue
        new_h, new_w = ResizeShortestEdge.get_output_shape(height, width, min(scales), max_size)
        side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        sides.append(side)
        resized.append(side * math.sqrt(new_h * new_w / (height * width)))
    anchor = float(gfl.ANCHOR_SCALE * min(strides))
    out: Dict[str, object] = {"smallest_anchor": anchor, "boxes": 0, "warning": None}
    if not sides:
        return out
    before, after = np.concatenate(sides), np.concatenate(resized)
    median_before, median_after = float(np.median(before)), float(np.median(after))
    _, counts = analyze_boxes(
        images, levels, strides, scales, max_size, anchor_scale=gfl.ANCHOR_SCALE,
        anchor_offset=gfl.ANCHOR_OFFSET, topk=gfl.TOPK,
        size_divisibility=size_divisibility or max(strides),
    )
    fraction = counts["unassigned"] / max(counts["boxes"], 1)
    limit = float(cfg.DATASETS.TILING.WARN_UNASSIGNED_FRACTION) if "TILING" in cfg.DATASETS else 0.05
    out.update(
        boxes=int(len(before)), median_sqrt_area=round(median_before, 1),
        median_sqrt_area_resized=round(median_after, 1),
        resize_factor=round(median_after / median_before, 3),
        unassigned=counts["unassigned"], assigned_boxes=counts["boxes"],
        unassigned_fraction=round(fraction, 4), unassigned_limit=limit,
    )
    problems = []
    if median_after < median_before * 0.999 and median_after < anchor:
        problems.append(
            f"the training resize (INPUT.MIN_SIZE_TRAIN {tuple(cfg.INPUT.MIN_SIZE_TRAIN)}, "
            f"MAX_SIZE_TRAIN {max_size}) shrinks the median box from {median_before:.0f} to "
            f"{median_after:.0f} px, below the smallest anchor ({anchor:g} px: ANCHOR_SCALE "
            f"{gfl.ANCHOR_SCALE:g} x stride {min(strides)})")
    if limit > 0 and fraction > limit:
        problems.append(f"{counts['unassigned']} of {counts['boxes']} boxes ({fraction:.0%}, more "
                        f"than DATASETS.TILING.WARN_UNASSIGNED_FRACTION {limit:g}) get no positive "
                        "anchor and are never learned")
    if problems:
        size = cfg.DATASETS.TILING.SIZE if "TILING" in cfg.DATASETS else max(scales)
        out["warning"] = (
            "; ".join(problems) + f". Tile the images (DATASETS.TILING.MODE grid, "
            f"DATASETS.TILING.SIZE {size}; docs/own_data.md), or raise INPUT.MIN_SIZE_TRAIN and "
            "INPUT.MAX_SIZE_TRAIN towards the images' own size")
    return out


def _level_summary(stats: Sequence[LevelStats], reg_max: int) -> List[Dict[str, object]]:
    total = sum(s.num_positives for s in stats) or 1
    rows = []
    for s in stats:
        d = s.distances
        row = {"level": s.name, "stride": s.stride, "positives": s.num_positives,
               "share": round(s.num_positives / total, 4)}
        if d.size:
            row.update({f"p{q}": round(float(np.percentile(d, q)), 2) for q in (50, 99, 99.9)})
        row["max"] = round(float(d.max()), 2) if d.size else None
        row["clamped"] = s.clamped(reg_max)
        rows.append(row)
    return rows


def analyze_dataset(
    images: Sequence[ImageBoxes],
    cfg,
    known_strides: Dict[str, int],
    size_divisibility: int,
    max_clamped_fraction: float = 0.001,
    min_level_share: float = 0.01,
) -> Tuple[Dict[str, object], List[LevelStats], List[LevelStats]]:
    """Box sizes, per-level distances and clamps under the config, and the recommendation. A
    recommended change of levels is tried (the boxes assigned again) and kept only if it leaves
    no more boxes without a positive anchor. Returns the report and the stats of the config's
    and of the recommended levels."""
    gfl = cfg.MODEL.GFL
    scales, max_size = training_scales(cfg), cfg.INPUT.MAX_SIZE_TRAIN

    def run(levels):
        return analyze_boxes(
            images, levels, level_strides(levels, known_strides), scales, max_size,
            anchor_scale=gfl.ANCHOR_SCALE, anchor_offset=gfl.ANCHOR_OFFSET, topk=gfl.TOPK,
            size_divisibility=size_divisibility,
        )

    checks = {}
    tiling = cfg.DATASETS.TILING if "TILING" in cfg.DATASETS else None
    if tiling is not None and tiling.SIZE > 0:
        from .tiling_config import tiling_spec

        spec = tiling_spec(cfg, train=True)
        tiled = tile_image_boxes(images, spec)
        checks["whole_images"] = resize_check(images, cfg, known_strides, size_divisibility)
        checks["tiled"] = dict(resize_check(tiled, cfg, known_strides, size_divisibility),
                               tiles=len(tiled), tile_size=spec.tile_size, overlap=spec.overlap)
        if tiling.MODE:  # training sees the tiles: analyse them
            images = tiled
    levels = list(gfl.IN_FEATURES)
    stats, counts = run(levels)
    rec = recommend(stats, gfl.REG_MAX, max_clamped_fraction, min_level_share)
    report: Dict[str, object] = {
        "box_sizes": box_size_stats(images),
        "training_scales": scales,
        "max_size": max_size,
        "config": {"REG_MAX": gfl.REG_MAX, "IN_FEATURES": levels, "TOPK": gfl.TOPK,
                   "ANCHOR_SCALE": gfl.ANCHOR_SCALE},
        "assignment": counts,
        "levels": _level_summary(stats, gfl.REG_MAX),
        "clamped": rec["clamped"],
        "targets": rec["targets"],
        "clamped_fraction": rec["clamped_fraction"],
        "covering_reg_max": rec["covering_reg_max"],
        "recommended": {"REG_MAX": rec["reg_max"], "IN_FEATURES": rec["in_features"]},
        "max_clamped_fraction": max_clamped_fraction,
        "min_level_share": min_level_share,
        "tiling_mode": tiling.MODE if tiling is not None else "",
        "resize_check": checks,
        "warnings": [c["warning"] for k, c in checks.items()
                     if c["warning"] and (k == "tiled") == bool(tiling is not None and tiling.MODE)],
    }
    if rec["in_features"] == levels:
        return report, stats, stats
    rec_levels = rec["in_features"]
    rec_stats, rec_counts = run(rec_levels)
    # REG_MAX on the recommended levels: the current one if it fits there, else covering.
    reg_max = recommend(rec_stats, gfl.REG_MAX, max_clamped_fraction, min_level_share)["reg_max"]
    # A level with few positives still adds ATSS candidates, which lower the IoU threshold
    # (mean + std) of the others: dropping it can leave boxes without any positive.
    accepted = rec_counts["unassigned"] <= counts["unassigned"]
    report["recommended_check"] = {
        "in_features": rec_levels,
        "reg_max": reg_max,
        "levels": _level_summary(rec_stats, reg_max),
        "assignment": rec_counts,
        "clamped_fraction": recommend(rec_stats, reg_max)["clamped_fraction"],
        "accepted": accepted,
    }
    if not accepted:
        report["recommended"]["IN_FEATURES"] = levels
        return report, stats, stats
    report["recommended"] = {"REG_MAX": reg_max, "IN_FEATURES": rec_levels}
    return report, stats, rec_stats


def _table(levels: Sequence[Dict[str, object]], reg_max: int) -> List[str]:
    nan = float("nan")
    out = [f"  {'level':5s} {'stride':>6s} {'positives':>9s} {'share':>6s} {'p50':>6s} "
           f"{'p99':>6s} {'p99.9':>6s} {'max':>6s} {'> ' + str(reg_max) + '-0.1':>9s}"]
    for r in levels:
        out.append(
            f"  {r['level']:5s} {r['stride']:6d} {r['positives']:9d} {r['share']:6.1%} "
            f"{r.get('p50', nan):6.2f} {r.get('p99', nan):6.2f} {r.get('p99.9', nan):6.2f} "
            f"{r['max'] or nan:6.2f} {r['clamped']:9d}"
        )
    return out


def format_report(report: Dict[str, object], name: str) -> str:
    """The printed form of :func:`analyze_dataset`'s report."""
    sizes, cfg, rec = report["box_sizes"], report["config"], report["recommended"]
    assignment = report["assignment"]
    lines = [f"Dataset {name}: {sizes['images']} images, {sizes['boxes']} boxes "
             "(after the drop/clip rules)"]
    for key in ("width", "height", "sqrt_area"):
        if key in sizes:
            values = ", ".join(f"{k} {v}" for k, v in sizes[key].items())
            lines.append(f"  box {key:9s} px: {values}")
    lines.append(
        f"Training resize: short side {report['training_scales']}, long side <= "
        f"{report['max_size']}; ATSS top-{cfg['TOPK']}, anchor {cfg['ANCHOR_SCALE']} x stride; "
        f"{assignment['unassigned']} of {assignment['boxes']} boxes get no positive"
    )
    lines.append("Edge distances of the positives in stride units (DFL bins 0..REG_MAX), "
                 f"IN_FEATURES {cfg['IN_FEATURES']}, REG_MAX {cfg['REG_MAX']}:")
    lines += _table(report["levels"], cfg["REG_MAX"])
    lines.append(
        f"Clamped at REG_MAX - 0.1 = {cfg['REG_MAX'] - CLAMP_MARGIN:g}: {report['clamped']} of "
        f"{report['targets']} edge targets ({report['clamped_fraction']:.3%}; a clamped target's "
        "DFL is wrong)."
    )
    lines.append(f"Smallest REG_MAX clamping <= {report['max_clamped_fraction']:.1%}: "
                 f"{report['covering_reg_max']}")
    if "recommended_check" in report:
        check = report["recommended_check"]
        lines.append(f"Tried IN_FEATURES {check['in_features']} (boxes re-assigned), "
                     f"REG_MAX {check['reg_max']}:")
        lines += _table(check["levels"], check["reg_max"])
        verdict = "recommended" if check["accepted"] else "rejected, the levels stay"
        lines.append(
            f"  clamped {check['clamped_fraction']:.3%}; {check['assignment']['unassigned']} of "
            f"{check['assignment']['boxes']} boxes get no positive (now "
            f"{assignment['unassigned']}): {verdict}"
        )
    lines += _resize_lines(report)
    warnings = report.get("warnings") or []
    lines += [f"WARNING: {w}" for w in warnings]
    prefix = "Recommendation: first tile or resize (above); then " if warnings else "Recommendation: "
    lines.append(f"{prefix}MODEL.GFL.REG_MAX {rec['REG_MAX']}, "
                 f"MODEL.GFL.IN_FEATURES {rec['IN_FEATURES']}")
    return "\n".join(lines)


def _resize_lines(report: Dict[str, object]) -> List[str]:
    checks = report.get("resize_check") or {}
    lines = []
    for key, label in (("whole_images", "whole images"), ("tiled", "tiles")):
        c = checks.get(key)
        if not c or not c.get("boxes"):
            continue
        where = label if key == "whole_images" else (
            f"{c['tiles']} tiles of {c['tile_size']} px, overlap {c['overlap']}")
        used = " (trained on)" if (key == "tiled") == bool(report.get("tiling_mode")) else ""
        lines.append(
            f"After the training resize, {where}{used}: median box {c['median_sqrt_area']} -> "
            f"{c['median_sqrt_area_resized']} px (smallest anchor {c['smallest_anchor']:g} px); "
            f"{c['unassigned']} of {c['assigned_boxes']} boxes get no positive")
    return lines


def plot_histograms(
    stats: Sequence[LevelStats],
    reg_max: int,
    path: str,
    title: str = "",
    recommended: Optional[int] = None,
) -> None:
    """One histogram per level of the edge distances, with the clamp ``REG_MAX - 0.1``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max([reg_max + 1] + [float(s.distances.max()) + 1 for s in stats if s.distances.size])
    bins = np.arange(0, math.ceil(top) + 0.5, 0.5)
    fig, axes = plt.subplots(len(stats), 1, figsize=(7, 1.8 * len(stats) + 0.6), sharex=True,
                             squeeze=False)
    for ax, s in zip(axes[:, 0], stats):
        ax.hist(s.distances, bins=bins, color="tab:blue")
        ax.axvline(reg_max - CLAMP_MARGIN, color="tab:red",
                   label=f"clamp at REG_MAX {reg_max} - 0.1")
        if recommended is not None and recommended != reg_max:
            ax.axvline(recommended - CLAMP_MARGIN, color="tab:green", ls="--",
                       label=f"recommended REG_MAX {recommended}")
        ax.set_ylabel(f"{s.name} (/{s.stride})")
        ax.text(0.99, 0.8, f"{s.num_positives} positives, {s.clamped(reg_max)} clamped",
                transform=ax.transAxes, ha="right", fontsize=8)
    axes[0, 0].legend(fontsize=8, loc="upper center")
    axes[-1, 0].set_xlabel(
        "distance from the anchor center to a box edge (stride units; DFL bins 0..REG_MAX)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
