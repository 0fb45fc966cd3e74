"""A predictor for LazyConfig configs (detectron2's ``DefaultPredictor`` takes a YAML config)."""
from typing import Optional

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.config import instantiate

from .checkpoint import GFLCheckpointer

__all__ = ["LazyPredictor"]


class LazyPredictor:
    """Like ``DefaultPredictor``: one BGR image (H, W, 3) in, the model's output dict out.

    The model is ``cfg.model`` with the weights ``checkpoint`` (default
    ``cfg.train.init_checkpoint``) on ``device`` (default ``cfg.train.device``); images are
    resized by ``cfg.dataloader.test.mapper.augmentations`` and given to the model in
    ``cfg.dataloader.test.mapper.image_format``.
    """

    def __init__(self, cfg, checkpoint: Optional[str] = None, device: Optional[str] = None):
        mapper = cfg.dataloader.test.mapper
        self.input_format = mapper.image_format
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(
                f"dataloader.test.mapper.image_format={self.input_format!r}: LazyPredictor "
                "takes 'RGB' or 'BGR'"
            )
        self.augmentations = T.AugmentationList(list(instantiate(mapper.augmentations)))
        self.model = instantiate(cfg.model)
        self.model.to(device or cfg.train.device)
        self.model.eval()
        weights = cfg.train.init_checkpoint if checkpoint is None else checkpoint
        GFLCheckpointer(self.model).load(weights)

    def __call__(self, original_image: np.ndarray) -> dict:
        if original_image.ndim != 3 or original_image.shape[2] != 3:
            raise ValueError(f"LazyPredictor takes an (H, W, 3) BGR image, got shape "
                             f"{original_image.shape}")
        with torch.no_grad():
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            aug_input = T.AugInput(np.ascontiguousarray(original_image))
            self.augmentations(aug_input)
            image = torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1))
            return self.model([{"image": image, "height": height, "width": width}])[0]
