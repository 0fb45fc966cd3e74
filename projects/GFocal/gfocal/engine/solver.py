"""An SGD for LazyConfig configs with the gradient clipping of the YAML key SOLVER.CLIP_GRADIENTS
(detectron2's ``maybe_add_gradient_clipping`` only reads a YAML config), configured as detectron2's
own ``build_optimizer`` configures it (upstream main passes ``foreach=True``, 0.6 does not)."""
from typing import Any, Dict, List, Optional

import torch

from detectron2.config import CfgNode, get_cfg
from detectron2.solver import build as solver_build
from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = ["sgd"]


def sgd(
    params: List[Dict[str, Any]],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
    clip_gradients: Optional[Dict[str, Any]] = None,
    foreach: Optional[bool] = None,
) -> torch.optim.Optimizer:
    """``torch.optim.SGD``, clipping gradients as detectron2 does for ``clip_gradients`` =
    ``dict(clip_type="norm" | "value", clip_value=..., norm_type=...)`` (None: no clipping).
    ``foreach=None``: as the installed detectron2's ``build_optimizer`` (the YAML path) sets it."""
    clip = CfgNode({"ENABLED": clip_gradients is not None, "CLIP_TYPE": "value", "CLIP_VALUE": 1.0,
                    "NORM_TYPE": 2.0})
    for key, value in (clip_gradients or {}).items():
        if key.upper() not in clip or key.upper() == "ENABLED":
            raise ValueError(f"optimizer.clip_gradients: unknown key {key!r}; use clip_type, "
                             "clip_value, norm_type")
        clip[key.upper()] = value
    optimizer_class = maybe_add_gradient_clipping(CfgNode({"SOLVER": {"CLIP_GRADIENTS": clip}}),
                                                  torch.optim.SGD)
    if foreach is None:
        foreach = detectron2_sgd_foreach()
    return optimizer_class(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov, foreach=foreach)


def detectron2_sgd_foreach() -> Optional[bool]:
    """The ``foreach`` option of the SGD that detectron2's ``build_optimizer`` makes: True on
    upstream main, None (torch's choice) on 0.6. Read from a probe optimizer rather than from the
    version, which is 0.6 for both."""
    probe = solver_build.build_optimizer(get_cfg(), torch.nn.Linear(1, 1))
    return probe.defaults.get("foreach")
