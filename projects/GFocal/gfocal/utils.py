"""Small helpers about the detectron2 installation."""
import functools


@functools.lru_cache(maxsize=None)
def has_detectron2_ops() -> bool:
    """Whether detectron2's compiled C++/CUDA ops are available (deformable convolution in
    detectron2 0.6, the fast COCO evaluation). Upstream detectron2 built from source has them;
    the 0.6 release installed by tools/install_detectron2.py does not."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True
