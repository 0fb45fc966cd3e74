# Step schedules with linear warmup (the YAML WarmupMultiStepLR).
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler


def multistep(max_iter: int, steps, warmup_iters: int, warmup_factor: float, gamma: float = 0.1):
    """The lr multiplier of SOLVER.{MAX_ITER, STEPS, WARMUP_ITERS, WARMUP_FACTOR, GAMMA}."""
    steps = [s for s in steps if s <= max_iter]
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[gamma**k for k in range(len(steps) + 1)], milestones=steps, num_updates=max_iter
        ),
        warmup_length=min(warmup_iters / max_iter, 1.0),
        warmup_factor=warmup_factor,
    )


# GFL R-50 1x: 90k iterations of 16 images, steps at 60k and 80k, 500 warmup iterations.
lr_multiplier_1x = multistep(90000, [60000, 80000], 500, 1.0 / 3)
