from .atss import atss_assign
from .backbone import LastLevelP6P7, build_gfl_resnet_fpn_backbone
from .efficientnet_lite import (
    EfficientNetLite,
    build_efficientnet_lite0_backbone,
    build_efficientnet_lite0_fpn_backbone,
)
from .gfl import GFL
from .head import GFLHead
from .inference_thresholds import get_inference_thresholds, inference_thresholds, set_inference_thresholds
from .integral import Integral, boxes_to_distances, distances_to_boxes
from .loss_variants import QUALITY_VARIANTS, GFLLossConfig
from .losses import distribution_focal_loss, giou_loss, quality_focal_loss

__all__ = [k for k in globals().keys() if not k.startswith("_")]
