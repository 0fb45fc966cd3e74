"""GFL (Generalized Focal Loss) for detectron2. Importing this package registers the ``GFL``
meta-architecture and the GFL backbones in detectron2's registries.

Where things live: ``modeling/`` (the detector), ``data/`` (dataset formats and augmentation),
``tiling/`` (the window grid), ``engine/`` (trainer, hooks, launch), ``inference/`` (predictors,
TTA, whole images), ``evaluation/``, ``model_io/`` (checkpoints, conversion, zoo, export)."""
from .config import add_gfl_config, check_gfl_config, load_config, load_lazy_config
from .modeling import GFL, GFLHead, build_gfl_resnet_fpn_backbone
from . import data  # noqa: F401  (registers the tree-crown datasets, lazily)
from .model_io import model_zoo  # noqa: F401  (``from gfocal import model_zoo``, as detectron2's)

__all__ = ["add_gfl_config", "check_gfl_config", "load_config", "load_lazy_config", "GFL", "GFLHead", "build_gfl_resnet_fpn_backbone"]
