#!/usr/bin/env python
"""Choose inference settings on training data: COCO AP and precision/recall at IoU 0.4 of a
trained model for several NMS IoU thresholds, on the training tiles (where the choice is made,
by ``--criterion``) and on the validation tiles (reported, not used to choose).

    .venv/bin/python tools/sweep_inference.py --config-file configs/trees/gfl_lite0_trees.yaml \\
        --weights output/main_job/train/model_final.pth [--nms 0.6 0.5 0.4 0.3 0.2] [KEY VALUE ...]

Prints a Markdown table and writes it with the numbers to ``<output-dir>/sweep_inference.json``.
"""
import argparse
import json
import os
import sys
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(REPO, "configs/trees/gfl_lite0_trees.yaml"))
    p.add_argument("--weights", required=True, help="trained checkpoint (model_final.pth)")
    p.add_argument("--nms", nargs="+", type=float, default=[0.6, 0.5, 0.4, 0.3, 0.2])
    p.add_argument("--choose-on", default="neon_trees_train", help="dataset the choice is made on")
    p.add_argument("--report-on", default="neon_trees_val", help="dataset only reported")
    p.add_argument(
        "--criterion",
        default="AP50",
        choices=["AP", "AP50", "best_f1"],
        help="what the choice maximises on --choose-on (AP50: the COCO measure nearest to the "
        "tree-crown IoU-0.4 evaluation)",
    )
    p.add_argument("--output-dir", default=os.path.join(REPO, "output/sweep_inference"))
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    from gfocal.config import split_config_overrides

    # Split first: a list flag (--nms / --seeds ...) would read trailing KEY VALUE pairs as values.
    flags, opts = split_config_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(flags)
    args.opts = list(args.opts) + opts
    return args


def main(argv=None) -> List[Dict[str, float]]:
    args = parse_args(argv)
    from gfocal.config import load_config
    from gfocal.engine import Trainer
    from gfocal.model_io.weights import load_evaluated_weights
    from gfocal.modeling.inference_thresholds import inference_thresholds

    if not os.path.isfile(args.weights):
        raise FileNotFoundError(f"--weights: no file {args.weights}")
    cfg = load_config(args.config_file, args.opts)
    cfg.DATASETS.TEST = (args.choose_on, args.report_on)
    cfg.TEST.PRECISION_RECALL.ENABLED = True
    cfg.OUTPUT_DIR = args.output_dir
    model = Trainer.build_model(cfg)
    load_evaluated_weights(cfg, model, args.weights)  # the EMA weights where evaluation uses them
    rows = []
    for nms in args.nms:
        with inference_thresholds(model, nms_thresh=nms):
            res = Trainer.test(cfg, model)
        choose, report = res[args.choose_on], res[args.report_on]
        rows.append({
            "nms": nms,
            "choose_AP": choose["bbox"]["AP"], "choose_AP50": choose["bbox"]["AP50"],
            "choose_best_f1": choose["pr"]["best_f1"],
            "choose_score_thresh": choose["pr"]["best_f1_score_thresh"],
            "report_AP": report["bbox"]["AP"], "report_AP50": report["bbox"]["AP50"],
            "report_AP75": report["bbox"]["AP75"],
        })
    best = max(rows, key=lambda r: r[f"choose_{args.criterion}"])
    lines = [
        f"| NMS IoU | {args.choose_on} AP | AP50 | best F1@0.4 (score) | {args.report_on} AP | AP50 | AP75 |",
        "|---|---|---|---|---|---|---|",
    ] + [
        f"| {r['nms']:g}{' (chosen)' if r is best else ''} | {r['choose_AP']:.1f} | {r['choose_AP50']:.1f} | "
        f"{r['choose_best_f1']:.1f} ({r['choose_score_thresh']:.2f}) | {r['report_AP']:.1f} | "
        f"{r['report_AP50']:.1f} | {r['report_AP75']:.1f} |"
        for r in rows
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "sweep_inference.json"), "w") as f:
        json.dump(
            {"rows": rows, "criterion": args.criterion, "chosen_nms": best["nms"], "table": text},
            f,
            indent=1,
        )
    return rows


if __name__ == "__main__":
    main()
