"""A predictor for LazyConfig configs (detectron2's ``DefaultPredictor`` takes a YAML config), and
``DefaultPredictor`` with checked inputs and :class:`GFLCheckpointer`'s errors."""
from typing import Optional

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.config import CfgNode, instantiate
from detectron2.engine import DefaultPredictor

from ..model_io.checkpoint import GFLCheckpointer
from ..engine.hooks.ema import apply_checkpoint_ema
from ..input_checks import check_bgr_image

__all__ = ["LazyPredictor", "GFLPredictor"]


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
        check_bgr_image(original_image, "LazyPredictor")
        with torch.no_grad():
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            aug_input = T.AugInput(np.ascontiguousarray(original_image))
            self.augmentations(aug_input)
            image = torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1))
            return self.model([{"image": image, "height": height, "width": width}])[0]


class GFLPredictor(DefaultPredictor):
    """detectron2's ``DefaultPredictor`` (YAML config, same outputs) that refuses what it cannot
    read as an (H, W, 3) 0-255 BGR image with a message naming the problem
    (:func:`~gfocal.input_checks.check_bgr_image`), and loads ``MODEL.WEIGHTS`` with
    :class:`GFLCheckpointer` (named errors for unreadable files and head mismatches)."""

    def __init__(self, cfg: CfgNode):
        no_weights = cfg.clone()
        no_weights.defrost()
        no_weights.MODEL.WEIGHTS = ""
        super().__init__(no_weights)
        self.cfg = cfg.clone()
        GFLCheckpointer(
            self.model, head_mismatch=cfg.MODEL.GFL.CHECKPOINT_HEAD_MISMATCH
        ).load(cfg.MODEL.WEIGHTS)
        # MODEL_EMA.ENABLED + USE_EMA_WEIGHTS_FOR_EVAL_ONLY: predict with the checkpoint's
        # averaged weights, as the evaluation after training does.
        apply_checkpoint_ema(cfg, self.model, cfg.MODEL.WEIGHTS)

    def __call__(self, original_image: np.ndarray) -> dict:
        check_bgr_image(original_image, "GFLPredictor")
        return super().__call__(original_image)
