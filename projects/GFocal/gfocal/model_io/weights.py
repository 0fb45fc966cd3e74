"""Which weights of a checkpoint a model predicts with: the one rule shared by evaluation
(``train_net.py --eval-only``, the evaluation after training), every predictor
(:class:`~gfocal.inference.GFLPredictor`, :class:`~gfocal.inference.LazyPredictor`,
:class:`~gfocal.inference.TiledPredictor` and SAHI's model built from it) and
``tools/export_model.py``.

The rule: the *evaluated* weights. With ``MODEL_EMA.ENABLED`` and
``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY`` (LazyConfig: ``train.model_ema.enabled`` and
``use_ema_weights_for_eval_only``) those are the checkpoint's averaged weights (its
``"ema_state"``), otherwise its raw ``"model"`` weights. Plain detectron2 ``DefaultPredictor(cfg)``
knows nothing of EMA and loads the raw weights (docs/reliability.md).
"""
import logging
from typing import Optional

from torch import nn

__all__ = ["evaluates_ema_weights", "load_evaluated_weights"]

logger = logging.getLogger(__name__)


def evaluates_ema_weights(cfg) -> bool:
    """True when ``cfg`` (a yacs ``CfgNode`` or a LazyConfig) evaluates the EMA weights."""
    if hasattr(cfg, "MODEL_EMA"):
        ema = cfg.MODEL_EMA
        return bool(ema.ENABLED and ema.USE_EMA_WEIGHTS_FOR_EVAL_ONLY)
    train = cfg.get("train", None) if hasattr(cfg, "get") else None
    ema = (train.get("model_ema", None) if train is not None else None) or {}
    return bool(ema.get("enabled", False) and ema.get("use_ema_weights_for_eval_only", False))


def _ema_state(cfg, model: nn.Module):
    from ..engine.hooks.ema import EMAState, build_ema_state

    if hasattr(cfg, "MODEL_EMA"):
        return build_ema_state(cfg, model)
    ema = cfg.train.model_ema
    return EMAState(ema.get("include_frozen", True), ema.get("include_buffer", True),
                    ema.get("device", "")).copy_from(model)


def load_evaluated_weights(
    cfg, model: nn.Module, path: str, head_mismatch: Optional[str] = None
) -> str:
    """Load checkpoint ``path`` into ``model`` with :class:`GFLCheckpointer` (named errors), then,
    when :func:`evaluates_ema_weights`, copy its EMA averages in (a checkpoint without an
    ``"ema_state"`` is refused, naming the key to change). Returns ``"ema"`` or ``"raw"``, or
    ``"init"`` for an empty ``path`` (nothing loaded: the model keeps its initial weights)."""
    from ..engine.hooks.ema import load_ema_for_eval
    from .checkpoint import GFLCheckpointer

    if head_mismatch is None:
        head_mismatch = cfg.MODEL.GFL.CHECKPOINT_HEAD_MISMATCH if hasattr(cfg, "MODEL") else "error"
    if not path:
        return "init"
    if not evaluates_ema_weights(cfg):
        GFLCheckpointer(model, head_mismatch=head_mismatch).load(path)
        return "raw"
    ema_state = _ema_state(cfg, model)
    checkpointer = GFLCheckpointer(model, head_mismatch=head_mismatch, ema_state=ema_state)
    checkpointer.load(path, checkpointables=[])
    load_ema_for_eval(checkpointer, path, True).apply_to(model)
    return "ema"
