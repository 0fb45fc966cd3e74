"""GFL (Generalized Focal Loss) for detectron2. Importing this package registers the ``GFL``
meta-architecture and the GFL backbones in detectron2's registries."""
from .config import add_gfl_config, check_gfl_config
from .modeling import GFL, GFLHead, build_gfl_resnet_fpn_backbone
from . import data  # noqa: F401  (registers the tree-crown datasets, lazily)

__all__ = ["add_gfl_config", "check_gfl_config", "GFL", "GFLHead", "build_gfl_resnet_fpn_backbone"]
