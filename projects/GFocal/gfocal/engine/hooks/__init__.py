"""Training hooks: the weight EMA and the non-finite loss guard."""
from .ema import EMAHook, EMAState, apply_checkpoint_ema, build_ema_state, load_ema_for_eval
from .nonfinite_guard import NonFiniteLossError, NonFiniteLossGuard

__all__ = ["EMAHook", "EMAState", "apply_checkpoint_ema", "build_ema_state", "load_ema_for_eval",
           "NonFiniteLossError", "NonFiniteLossGuard"]
