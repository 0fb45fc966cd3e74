"""GFL's anchors: one square anchor per location and level (only its center and the ATSS
assignment use it), and the geometry of the positives in units of their level's stride. The model
and the dataset analysis (:mod:`gfocal.data.analysis`) both use these."""
from typing import List, Sequence, Tuple

from torch import Tensor

from detectron2.layers import cat
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes

__all__ = ["gfl_anchor_generator", "flatten_anchors", "in_stride_units"]


def gfl_anchor_generator(
    strides: Sequence[int], anchor_scale: float = 8.0, offset: float = 0.0
) -> DefaultAnchorGenerator:
    """Square anchors of side ``anchor_scale x stride`` (``MODEL.GFL.ANCHOR_SCALE``, mmdetection's
    octave_base_scale) centered at ``(x + offset) * stride`` (``MODEL.GFL.ANCHOR_OFFSET``)."""
    strides = list(strides)
    return DefaultAnchorGenerator(
        sizes=[[anchor_scale * s] for s in strides],
        aspect_ratios=[1.0],
        strides=strides,
        offset=offset,
    )


def flatten_anchors(anchors: List[Boxes], strides: Sequence[int]) -> Tuple[Tensor, Tensor, List[int]]:
    """Per-level anchors -> (R, 4) anchors of all levels, (R,) the stride of each, and the
    number of anchors per level (the layout :func:`~gfocal.modeling.atss.atss_assign` takes)."""
    num_per_level = [len(a) for a in anchors]
    flat = Boxes.cat(anchors).tensor
    per_anchor = cat([flat.new_full((n,), float(s)) for n, s in zip(num_per_level, strides)])
    return flat, per_anchor, num_per_level


def in_stride_units(anchors: Tensor, strides: Tensor, boxes: Tensor) -> Tuple[Tensor, Tensor]:
    """Anchor centers (P, 2) and their GT boxes (P, 4) divided by the stride of each anchor's level
    (``strides`` (P, 1)): the frame of the distances of Eq. 5-7."""
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2 / strides
    return centers, boxes / strides
