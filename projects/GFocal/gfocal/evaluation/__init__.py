from .coco_metrics import METRIC_KEYS, box_metrics, logged_box_metrics
from .precision_recall import PrecisionRecallEvaluator, best_f1_threshold, precision_recall

__all__ = ["METRIC_KEYS", "box_metrics", "logged_box_metrics", "PrecisionRecallEvaluator",
           "best_f1_threshold", "precision_recall"]
