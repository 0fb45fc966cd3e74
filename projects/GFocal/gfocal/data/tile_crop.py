"""Random training windows of large images (``DATASETS.TILING.MODE "crop"``).

:class:`TileCropMapper` is detectron2's ``DatasetMapper`` with one step first: a record marked
``tile_crop`` (gfocal/data/tiling_config.py) is cut to a random ``DATASETS.TILING.SIZE`` window,
uniform over the positions inside the image, read window by window (rasterio for TIFF; other
formats decoded once per worker and kept for the next crop). Its boxes follow the box rule at the
cuts of :func:`gfocal.tiling.tile_boxes` (clipped; ``iscrowd`` below ``MIN_VISIBLE`` of their area,
so not trained on; dropped when thinner than ``MIN_SIDE``). A crop without a normal box is kept
with probability ``EMPTY_FRACTION``, else drawn again (up to :data:`MAX_DRAWS` times). The
numbers come from numpy's global generator, which detectron2 seeds per worker from ``SEED``.
"""
import copy
from typing import Tuple

import numpy as np
import torch

from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from .tiles import source_boxes, TilingSpec
from ..tiling import tile_boxes

__all__ = ["MAX_DRAWS", "TileCropMapper", "build_train_mapper", "random_window"]

MAX_DRAWS = 10


def random_window(image_hw: Tuple[int, int], size: int, rng=np.random) -> Tuple[int, int, int, int]:
    """A uniformly placed ``size`` window inside the image (the image itself when smaller)."""
    height, width = image_hw
    x0 = int(rng.randint(0, max(width - size, 0) + 1))
    y0 = int(rng.randint(0, max(height - size, 0) + 1))
    return x0, y0, min(x0 + size, width), min(y0 + size, height)


def crop_annotations(record: dict, window, spec: TilingSpec) -> list:
    """The record's boxes in window pixels after the box rule, as XYXY_ABS annotations."""
    boxes, classes, crowd = source_boxes(record)
    x0, y0, x1, y1 = window
    w = boxes[:, 2].clip(x0, x1) - boxes[:, 0].clip(x0, x1)
    h = boxes[:, 3].clip(y0, y1) - boxes[:, 1].clip(y0, y1)
    side = max(spec.min_side, 1e-6)
    keep = (w >= side) & (h >= side)
    clipped, cut = tile_boxes(boxes, np.asarray(window, dtype=np.float64), spec.min_visible,
                              spec.min_side)
    return [{"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(c), "iscrowd": int(k)}
            for b, c, k in zip(clipped.tolist(), classes[keep].tolist(),
                               (cut | crowd[keep]).tolist())]


class TileCropMapper(DatasetMapper):
    """``DatasetMapper`` that first cuts ``tile_crop`` records to a random window (module doc)."""

    def __init__(self, cfg=None, is_train: bool = True, *, spec=None, **kwargs):
        """From a YAML ``cfg`` (``DATASETS.TILING``), or without one from ``spec`` (a
        :class:`TilingSpec` or a dict of its fields) and ``DatasetMapper``'s explicit arguments
        (LazyConfig: ``dataloader.tiling.mode="crop"``)."""
        from .tiling_config import tiling_spec

        if cfg is not None:
            super().__init__(cfg, is_train, **kwargs)
            self.spec = tiling_spec(cfg, train=True)
        else:
            if spec is None:
                raise ValueError("TileCropMapper: give a config or a tiling spec")
            super().__init__(is_train=is_train, **kwargs)
            self.spec = spec if isinstance(spec, TilingSpec) else TilingSpec(**dict(spec))
        self._reader = None

    def _read(self, path: str, window) -> np.ndarray:
        from ..inference.reader import open_image

        if self._reader is None or self._reader.path != path:
            if self._reader is not None:
                self._reader.close()
            self._reader = open_image(path)
        rgb = self._reader.read(*window)
        return rgb if self.image_format == "RGB" else np.ascontiguousarray(rgb[:, :, ::-1])

    def __call__(self, dataset_dict):
        if not dataset_dict.get("tile_crop"):
            return super().__call__(dataset_dict)
        record = copy.deepcopy(dataset_dict)
        for _ in range(MAX_DRAWS):
            window = random_window((record["height"], record["width"]), self.spec.tile_size)
            annotations = crop_annotations(record, window, self.spec)
            if any(not a["iscrowd"] for a in annotations) or \
                    np.random.rand() < self.spec.empty_fraction:
                break
        image = self._read(record["file_name"], window)
        record.update(annotations=annotations, height=image.shape[0], width=image.shape[1],
                      tile_window=list(window))
        record.pop("tile_crop")
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            record.pop("annotations", None)
            return record
        self._transform_annotations(record, transforms, image.shape[:2])
        return record


def build_train_mapper(cfg, augmentations) -> DatasetMapper:
    """The training mapper: :class:`TileCropMapper` with ``DATASETS.TILING.MODE "crop"``."""
    if cfg.DATASETS.get("TILING") is not None and cfg.DATASETS.TILING.MODE == "crop":
        return TileCropMapper(cfg, is_train=True, augmentations=augmentations)
    return DatasetMapper(cfg, is_train=True, augmentations=augmentations)
