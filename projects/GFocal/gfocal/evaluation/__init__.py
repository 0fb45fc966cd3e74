from .precision_recall import PrecisionRecallEvaluator, best_f1_threshold, precision_recall

__all__ = ["PrecisionRecallEvaluator", "best_f1_threshold", "precision_recall"]
