"""The COCO box metrics the project reports (AP, AP50, AP75, in %), read from detectron2's results:
the nested dict that ``Trainer.test_all`` / ``DefaultTrainer.test`` return, or the flattened
scalars that the evaluation hook writes into ``OUTPUT_DIR/metrics.json``. COCOEvaluator gives
NaN when the model made no detection at all; these count as 0 here."""
import json
import math
from typing import Dict, Mapping

__all__ = ["METRIC_KEYS", "box_metrics", "logged_box_metrics"]

METRIC_KEYS = ("AP", "AP50", "AP75")


def _prefix(dataset: str, suffix: str, num_datasets: int) -> str:
    # DefaultTrainer.test returns the results of its only dataset unnested ({"bbox": ...}); the
    # project's "_TTA" / "_raw" results are named by appending the suffix to the first key.
    return f"bbox{suffix}" if num_datasets == 1 else f"{dataset}{suffix}/bbox"


def box_metrics(results: Mapping, dataset: str, suffix: str = "", num_datasets: int = 1
                ) -> Dict[str, float]:
    """AP/AP50/AP75 of ``dataset`` (evaluated among ``num_datasets``) in detectron2's nested
    results; ``suffix`` "_TTA" or "_raw" selects the test-time augmented or raw-weight results."""
    node = results
    for key in _prefix(dataset, suffix, num_datasets).split("/"):
        if key not in node:
            raise KeyError(f"no {key!r} in the evaluation results (keys {sorted(node)}): was "
                           f"{dataset!r} evaluated{' with ' + suffix if suffix else ''}?")
        node = node[key]
    return {k: _zero_if_nan(node[k]) for k in METRIC_KEYS}


def _zero_if_nan(value) -> float:
    value = float("nan") if value is None else float(value)
    return 0.0 if math.isnan(value) else value


def logged_box_metrics(metrics_json: str, dataset: str, suffix: str = "", num_datasets: int = 1
                       ) -> Dict[str, float]:
    """The same metrics from the last evaluation written into a training run's metrics.json."""
    keys = {k: f"{_prefix(dataset, suffix, num_datasets)}/{k}" for k in METRIC_KEYS}
    last = None
    with open(metrics_json) as f:
        for line in f:
            record = json.loads(line) if line.strip() else {}
            if all(key in record for key in keys.values()):
                last = record
    if last is None:
        raise KeyError(f"{metrics_json}: no evaluation with {sorted(keys.values())} (did the run "
                       "evaluate after training? TEST.EVAL_PERIOD, DATASETS.TEST)")
    return {k: _zero_if_nan(last[key]) for k, key in keys.items()}
