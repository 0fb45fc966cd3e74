"""Small helpers about the detectron2 installation."""
import functools
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def has_detectron2_ops() -> bool:
    """Whether detectron2's compiled C++/CUDA ops are available (deformable convolution, the fast
    COCO evaluation). Upstream detectron2 built from source has them; the 0.6 release installed by
    tools/install_detectron2.py and a pure-Python install of upstream main do not."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def _deform_conv_class(modulated: bool):
    # The classes detectron2's ResNet builds (looked up at call time: tests may replace them).
    from detectron2.modeling.backbone import resnet

    return resnet.ModulatedDeformConv if modulated else resnet.DeformConv


def deform_conv_build_error(modulated: bool) -> Optional[str]:
    """Why detectron2's ResNet cannot build a deformable convolution here, or None if it can.

    Upstream detectron2 without its compiled ops replaces ``DeformConv`` and
    ``ModulatedDeformConv`` by dummies that raise ImportError when built; detectron2 0.6 patched
    by tools/install_detectron2.py builds them (and fails only when they run)."""
    layer = _deform_conv_class(modulated)
    try:
        with torch.device("meta"):
            layer(1, 1, 1)
    except ImportError as e:
        return f"detectron2's {layer.__name__} cannot be built ({e})"
    return None


def deform_conv_run_error(
    modulated: bool, device: str = "cpu", backward: bool = False
) -> Optional[str]:
    """Why a deformable convolution cannot run forward (and ``backward``) on ``device`` here, or
    None if it can. Without the ops only non-modulated DCN inference on CPU works (detectron2
    calls torchvision's ``deform_conv2d`` there); training and DCNv2 need the ops and CUDA."""
    build_error = deform_conv_build_error(modulated)
    if build_error:
        return build_error
    layer = _deform_conv_class(modulated)(1, 1, 1).to(device)
    x = torch.ones(1, 1, 2, 2, device=device, requires_grad=backward)
    offset = torch.zeros(1, 2, 2, 2, device=device)
    args = (x, offset, torch.ones(1, 1, 2, 2, device=device)) if modulated else (x, offset)
    try:
        y = layer(*args)
        if backward:
            y.sum().backward()
    except (NotImplementedError, RuntimeError, AttributeError, TypeError) as e:
        kind = "training" if backward else "inference"
        return f"detectron2's {layer.__class__.__name__} {kind} fails on {device}: {e}"
    return None
