"""Exponential moving average (EMA) of the model weights, as a detectron2 hook.

NanoDet, mmdetection's EMAHook, the YOLO family and d2go evaluate an average of the weights of
the last iterations rather than the last weights. The config keys are d2go's ``MODEL_EMA.*``
(``gfocal/config.py``). After every optimizer step each averaged tensor ``e`` of weight ``w``
becomes ``e + (1 - d) (w - e)``, i.e. ``d e + (1 - d) w``; written this way a tensor that does
not change (frozen parameters, FrozenBN buffers) stays bit-identical, so a frozen backbone
keeps its feature-cache fingerprint. With ``DECAY_WARM_UP_FACTOR`` ``f >= 0`` the decay of
update ``n`` is ``min(d, (1 + n) / (f + n))`` (TensorFlow's ``ExponentialMovingAverage``
``num_updates``), so that early averages do not hold the initial weights for long.

The averaged weights are the checkpointable ``"ema_state"`` of the checkpointer (saved in every
checkpoint, restored by ``--resume``). The model being trained (on every worker under DDP, where
every worker holds the same weights after each step, so the averages are the same too) keeps its
raw weights; evaluation swaps the averages in and back (:meth:`EMAState.apply_and_restore`).
"""
import contextlib
import logging
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from detectron2.engine import HookBase

__all__ = ["EMAState", "EMAHook", "unwrap_model", "build_ema_state", "load_ema_for_eval",
           "apply_checkpoint_ema"]

logger = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``, else ``model``."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel,
                                              nn.DataParallel)) else model


class EMAState:
    """Averaged copies of a model's parameters (and buffers) by name, with the update count.

    Args:
        include_frozen: also keep parameters with ``requires_grad=False`` (averaging a constant
            leaves it unchanged, so this only costs memory; d2go's default).
        include_buffer: also keep buffers (BatchNorm statistics); integer buffers are copied.
        device: where the averages live ("" = the model's device).
    """

    def __init__(self, include_frozen: bool = True, include_buffer: bool = True, device: str = ""):
        self.include_frozen = include_frozen
        self.include_buffer = include_buffer
        self.device = device
        self.state: Dict[str, Tensor] = {}
        self.num_updates = 0
        self.loaded = False  # set by load_state_dict: the averages came from a checkpoint

    def _named_tensors(self, model: nn.Module) -> Iterator[Tuple[str, Tensor]]:
        model = unwrap_model(model)
        for name, p in model.named_parameters():
            if p.requires_grad or self.include_frozen:
                yield name, p.detach()
        if self.include_buffer:
            yield from ((name, b.detach()) for name, b in model.named_buffers())

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> "EMAState":
        """Start the averages at the model's current weights."""
        self.state = {
            name: t.clone().to(self.device or t.device) for name, t in self._named_tensors(model)
        }
        self.num_updates = 0
        return self

    def decay_at(self, decay: float, warm_up_factor: float) -> float:
        """The decay of the next update (with the TF warm-up when ``warm_up_factor >= 0``)."""
        if warm_up_factor < 0:
            return decay
        n = self.num_updates + 1
        return min(decay, (1.0 + n) / (warm_up_factor + n))

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float, warm_up_factor: float = -1.0) -> None:
        """One EMA step towards the model's current weights: ``e += (1 - d) (w - e)``."""
        if not self.state:
            self.copy_from(model)
        d = self.decay_at(decay, warm_up_factor)
        for name, w in self._named_tensors(model):
            e = self.state[name]
            if e.is_floating_point():
                e.add_(w.to(e.device) - e, alpha=1.0 - d)
            else:  # counters such as num_batches_tracked
                e.copy_(w)
        self.num_updates += 1

    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> None:
        """Copy the averages into the model's tensors of the same names."""
        tensors = dict(self._named_tensors(model))
        missing = sorted(set(tensors) - set(self.state))
        if missing:
            raise KeyError(f"the EMA state has no average for {missing[:5]} (of {len(missing)})")
        for name, t in tensors.items():
            t.copy_(self.state[name])

    @contextlib.contextmanager
    def apply_and_restore(self, model: nn.Module):
        """Within the block the model holds the averaged weights; its own ones afterwards."""
        backup = {name: t.clone() for name, t in self._named_tensors(model)}
        self.apply_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, t in self._named_tensors(model):
                    t.copy_(backup[name])

    # Checkpointable (fvcore's Checkpointer saves ``state_dict()`` under "ema_state").
    def state_dict(self) -> dict:
        return {"state": dict(self.state), "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "state" not in state_dict:
            raise ValueError(
                "the checkpoint's 'ema_state' is not an EMA state (expected a dict with 'state' "
                f"and 'num_updates', got {type(state_dict).__name__})"
            )
        state = state_dict["state"]
        if self.state:
            unknown = sorted(set(state) ^ set(self.state))
            if unknown:
                raise KeyError(
                    f"the checkpoint's EMA state does not fit the model: names {unknown[:5]} are "
                    "in only one of them (MODEL_EMA.INCLUDE_FROZEN / INCLUDE_BUFFER changed?)"
                )
        # Checkpoints load on the CPU: back to where the averages were (the model's device).
        current = {k: v.device for k, v in self.state.items()}
        self.state = {
            k: v.to(self.device or current.get(k, v.device)) for k, v in state.items()
        }
        self.num_updates = int(state_dict.get("num_updates", 0))
        self.loaded = True


def build_ema_state(cfg, model: nn.Module) -> Optional[EMAState]:
    """An :class:`EMAState` started at ``model``'s weights if ``MODEL_EMA.ENABLED``, else None."""
    ema = cfg.MODEL_EMA
    if not ema.ENABLED:
        return None
    device = ema.DEVICE or ""
    return EMAState(ema.INCLUDE_FROZEN, ema.INCLUDE_BUFFER, device).copy_from(model)


def load_ema_for_eval(checkpointer, path: str, use_ema_weights: bool) -> Optional[EMAState]:
    """For ``--eval-only``: with ``use_ema_weights`` (``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY``)
    and a checkpointable ``"ema_state"`` (``MODEL_EMA.ENABLED``), the checkpoint's EMA state, to
    be swapped in for evaluation (:meth:`EMAState.apply_and_restore`); else None. Refuses a
    checkpoint without one."""
    ema_state = checkpointer.checkpointables.get("ema_state")
    if ema_state is None or not use_ema_weights:
        return None
    ema_state.loaded = False
    checkpointer.load(path, checkpointables=["ema_state"])
    if not ema_state.loaded:
        raise KeyError(
            f"MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY=True but checkpoint {path} has no "
            "'ema_state' (it was trained without MODEL_EMA.ENABLED); set "
            "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY False to evaluate its own weights"
        )
    logger.info("Evaluating the EMA weights of %s (%d updates)", path, ema_state.num_updates)
    return ema_state


def apply_checkpoint_ema(cfg, model: nn.Module, path: str) -> bool:
    """With ``MODEL_EMA.ENABLED`` and ``USE_EMA_WEIGHTS_FOR_EVAL_ONLY``, load checkpoint ``path``
    into ``model`` with its EMA weights (e.g. ``DefaultPredictor(cfg).model``, which loads the
    raw ones) and return True; else leave it and return False. The rule lives in
    :func:`gfocal.model_io.weights.load_evaluated_weights`."""
    from ...model_io.weights import evaluates_ema_weights, load_evaluated_weights

    if not evaluates_ema_weights(cfg):
        return False
    return load_evaluated_weights(cfg, model, path) == "ema"


class EMAHook(HookBase):
    """After every step, move the EMA state towards the trained model's weights.

    Before training, the averages start at the weights the model trains from: the trainer builds
    its EMA state before ``resume_or_load`` loads ``MODEL.WEIGHTS`` (or a checkpoint to resume),
    so unless that checkpoint restored an EMA state (``EMAState.loaded``), the state is copied
    from the model again here (as d2go's EMAHook does in ``before_train``).

    Place it before the checkpointer and evaluation hooks: a checkpoint or an evaluation after
    step ``i`` then sees the averages including step ``i``.
    """

    def __init__(self, ema_state: EMAState, decay: float, warm_up_factor: float = -1.0):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"MODEL_EMA.DECAY={decay} must be in [0, 1]")
        self.ema_state = ema_state
        self.decay = decay
        self.warm_up_factor = warm_up_factor

    def before_train(self) -> None:
        if not self.ema_state.loaded:
            self.ema_state.copy_from(self.trainer.model)
            logger.info("EMA of the weights started at the model's weights before iteration %d",
                        self.trainer.iter)

    def after_step(self) -> None:
        self.ema_state.update(self.trainer.model, self.decay, self.warm_up_factor)
