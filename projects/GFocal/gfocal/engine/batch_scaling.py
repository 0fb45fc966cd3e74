"""The linear scaling rule (Goyal et al., 2017: lr proportional to the batch size, warm-up over the
same number of images) for configs written for a reference batch.

``SOLVER.REFERENCE_IMS_PER_BATCH`` holds the batch a config's ``BASE_LR`` and ``WARMUP_ITERS``
were written for (16 in the COCO configs, as in the paper; 0 switches the rule off). With
``SOLVER.IMS_PER_BATCH`` = b and the reference r, ``BASE_LR`` becomes ``BASE_LR * b / r`` and
``WARMUP_ITERS`` becomes ``WARMUP_ITERS * r / b``. ``MAX_ITER`` and ``STEPS`` are left as given:
they depend on the user's dataset. detectron2's ``SOLVER.REFERENCE_WORLD_SIZE`` (which scales with
the number of workers) still applies afterwards and scales ``IMS_PER_BATCH`` and ``BASE_LR`` by one
factor, so both rules compose.
"""
from typing import Optional

__all__ = ["scale_solver_to_batch", "scale_lazy_solver_to_batch"]

KEY = "SOLVER.REFERENCE_IMS_PER_BATCH"


def _ratio(batch, reference, batch_key: str, reference_key: str) -> Optional[float]:
    for key, value, low in ((reference_key, reference, 0), (batch_key, batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key}={value!r} must be an integer >= {low}")
    return None if reference == 0 else batch / reference


def scale_solver_to_batch(cfg) -> Optional[str]:
    """Apply the rule to a (not frozen) YAML config in place; returns the log message, or None
    when off. Sets the reference to ``IMS_PER_BATCH``, so the dumped ``config.yaml`` read again
    (``--resume``) is not scaled twice."""
    solver = cfg.SOLVER
    ratio = _ratio(
        solver.IMS_PER_BATCH, solver.REFERENCE_IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH", KEY
    )
    if ratio is None:
        return None
    reference, lr, warmup = solver.REFERENCE_IMS_PER_BATCH, solver.BASE_LR, solver.WARMUP_ITERS
    solver.BASE_LR = lr * ratio
    solver.WARMUP_ITERS = int(round(warmup / ratio))
    solver.REFERENCE_IMS_PER_BATCH = solver.IMS_PER_BATCH
    if ratio == 1:
        return None
    return (
        f"Linear scaling rule ({KEY} {reference}, SOLVER.IMS_PER_BATCH {solver.IMS_PER_BATCH}): "
        f"SOLVER.BASE_LR {lr:g} -> {solver.BASE_LR:g}, SOLVER.WARMUP_ITERS {warmup} -> "
        f"{solver.WARMUP_ITERS}. Set {KEY} 0 to use BASE_LR as given."
    )


def scale_lazy_solver_to_batch(cfg) -> Optional[str]:
    """The same rule for a LazyConfig: ``train.reference_batch_size`` (absent or 0: off) against
    ``dataloader.train.total_batch_size``; scales ``optimizer.lr`` and the warm-up fraction
    ``lr_multiplier.warmup_length`` (capped at 1)."""
    reference = cfg.train.get("reference_batch_size", 0)
    batch = cfg.dataloader.train.total_batch_size
    ratio = _ratio(
        batch, reference, "dataloader.train.total_batch_size", "train.reference_batch_size"
    )
    if ratio is None:
        return None
    lr = cfg.optimizer.lr
    cfg.optimizer.lr = lr * ratio
    cfg.train.reference_batch_size = batch
    warmup = cfg.lr_multiplier.get("warmup_length", None)
    if warmup is not None:
        cfg.lr_multiplier.warmup_length = min(warmup / ratio, 1.0)
    if ratio == 1:
        return None
    return (
        f"Linear scaling rule (train.reference_batch_size {reference}, "
        f"dataloader.train.total_batch_size {batch}): optimizer.lr {lr:g} -> {cfg.optimizer.lr:g}"
        + (f", lr_multiplier.warmup_length {warmup:g} -> {cfg.lr_multiplier.warmup_length:g}"
           if warmup is not None else "")
        + ". Set train.reference_batch_size=0 to use optimizer.lr as given."
    )
