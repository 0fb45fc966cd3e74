"""The tree-crown main job's report (tools/main_job.py): the whole YELL images predicted tile by
tile and scored whole, and the printed summary of a run's ``summary.json``."""
from typing import Dict, List, Optional

from .coco_metrics import METRIC_KEYS

__all__ = ["whole_image_report", "format_summary"]


def whole_image_report(
    cfg, weights: str, score_thresh: float, iou: float, splits: List[str], tta: Optional[bool] = None
) -> Dict[str, dict]:
    """Tiled prediction of each whole YELL image of ``splits`` ("train", "val"; gfocal.inference:
    the config's test size as patch, a quarter patch overlap, seam rule and NMS; each tile with
    the config's test-time augmentation when ``tta``, None: when ``TEST.AUG.ENABLED``, as the
    tiles' evaluation),
    scored against its whole-image boxes: AP (up to 10000 detections per image) and P/R/F1 at
    ``iou`` and ``score_thresh``."""
    from ..inference import TiledPredictor
    from .whole_image import evaluate_whole_images, tree_whole_images

    predictor = TiledPredictor(cfg, weights=weights, tta=cfg.TEST.AUG.ENABLED if tta is None else tta)
    return {
        split: evaluate_whole_images(predictor, [tree_whole_images(split)], iou, score_thresh)
        for split in splits
    }


def format_summary(summary: dict, summary_json: str, vis_dir: str) -> str:
    """The main job's closing summary (validation AP, P/R/F1 at the threshold chosen on the
    training tiles, the training tiles, the whole images, times and where the files are)."""
    metrics, train_metrics = summary["metrics"], summary["train_metrics"]
    val_pr, train_at = summary["precision_recall"]["val"], summary["precision_recall"]["train"]
    whole, times = summary["whole_image"], summary["times"]
    diff = max(abs(metrics[k] - summary["eval_only_metrics"][k]) for k in METRIC_KEYS)
    grid = summary.get("threshold_tiles")  # the tiles the threshold was chosen on
    tiles = f"{grid['num_tiles']} of {grid['of']}" if grid else "all"
    lines = [
        "",
        "=" * 72,
        "[main_job] GFL on NEON tree crowns (validation tiles of 2019_YELL_2_541000_4977000)",
        "  " + "   ".join(f"{k} {metrics[k]:.1f}" for k in METRIC_KEYS)
        + f"   (seed {summary['seed']}; another: append SEED {summary['seed'] + 1})",
        "  at IoU {iou:g}, score >= {score_thresh:.2f} (best F1 on the training tiles): "
        "precision {precision:.1f}  recall {recall:.1f}  F1 {f1:.1f}".format(**val_pr),
        f"  training tiles ({tiles}, for comparison): "
        + "   ".join(f"{k} {train_metrics[k]:.1f}" for k in METRIC_KEYS)
        + "   F1 {f1:.1f}; median IoU of the hits: train {tiou:.2f}, validation {viou:.2f}".format(
            f1=train_at["f1"], tiou=train_at["median_hit_iou"], viou=val_pr["median_hit_iou"]
        ),
    ]
    for split, name in (("val", "validation"), ("train", "training")):
        if split in whole:
            w = whole[split]
            lines.append(
                f"  whole {name} image (tiled prediction, stitched): "
                + "   ".join(f"{k} {w[k]:.1f}" for k in METRIC_KEYS)
                + "   P {precision:.1f}  R {recall:.1f}  F1 {f1:.1f} ({tp}/{num_gt} crowns)".format(
                    **w["at_threshold"]
                )
            )
    lines += [
        f"  --eval-only with the checkpoint: same AP (largest difference {diff:.2g})",
        "  wall time {total_s:.0f} s (data {data_s:.0f} s, train+eval {train_and_eval_s:.0f} s, "
        "eval-only {eval_only_s:.0f} s, drawing {draw_s:.0f} s)".format(**times),
        f"  checkpoint:  {summary['checkpoint']}",
        f"  metrics:     {summary['metrics_json']} and {summary_json}",
        f"  images:      {vis_dir}/ ({len(summary['images'])} PNGs)",
        "=" * 72,
    ]
    return "\n".join(lines)
