# SGD as train_net.py builds it (detectron2's default parameter groups; weight decay on norms 0),
# with SOLVER.CLIP_GRADIENTS as `clip_gradients` (None: no clipping).
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from gfocal.engine.solver import sgd

SGD = L(sgd)(
    # params.model is set to the model before the optimizer is instantiated.
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
    clip_gradients=None,
)
