#!/usr/bin/env python
"""Does the main job's threshold subset choose the threshold all training tiles choose?

    .venv/bin/python benchmarks/threshold_tiles.py \\
        output/main_job_all/eval_only/inference_TTA/neon_trees_train/coco_instances_results.json

For each COCOEvaluator results file of the 132 training tiles (``neon_trees_train``; e.g. a main
job run with ``--threshold-tile-step 1``), the best-F1 score threshold at IoU 0.4
(``gfocal.evaluation.precision_recall.best_f1_threshold``) on all of them and on the tiles of
every N-th column and row of their grid and the last ones
(``gfocal.data.tree_crowns.register_tile_grid_subset``), for each ``--steps`` N.
"""
import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="coco_instances_results.json of neon_trees_train")
    p.add_argument("--steps", type=int, nargs="+", default=[2, 3])
    p.add_argument("--iou", type=float, default=0.4)
    args = p.parse_args(argv)

    from detectron2.data import DatasetCatalog

    import gfocal  # noqa: F401  (registers the tree-crown datasets)
    from gfocal.data.tree_crowns import register_tile_grid_subset
    from gfocal.evaluation.precision_recall import best_f1_threshold, coco_images

    subsets = {step: register_tile_grid_subset("train", step) for step in args.steps}
    ids = {step: {r["image_id"] for r in DatasetCatalog.get(name)} for step, name in subsets.items()}
    records = DatasetCatalog.get("neon_trees_train")
    header = ["results", f"all {len(records)} tiles"] + [f"step {s} ({len(ids[s])} tiles)" for s in args.steps]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for path in args.results:
        with open(path) as f:
            images = coco_images("neon_trees_train", json.load(f))
        cells = [path, best_f1_threshold(images, args.iou)]
        for step in args.steps:
            kept = [im for im, r in zip(images, records) if r["image_id"] in ids[step]]
            cells.append(best_f1_threshold(kept, args.iou))
        print("| " + " | ".join([cells[0]] + [f"{c['score_thresh']:.2f} (F1 {c['f1']:.1f})"
                                              for c in cells[1:]]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
