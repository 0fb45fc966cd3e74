"""A predictor for LazyConfig configs (detectron2's ``DefaultPredictor`` takes a YAML config), and
``DefaultPredictor`` with checked inputs, :class:`GFLCheckpointer`'s errors and the evaluated
weights. Both run the one forward path of :mod:`.forward` (``precision``, ``channels_last``)."""
from typing import Dict, Optional

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.config import CfgNode, instantiate
from detectron2.engine import DefaultPredictor

from ..input_checks import check_bgr_image
from ..model_io.weights import load_evaluated_weights
from .forward import check_precision, prepare_model, run_detector

__all__ = ["LazyPredictor", "GFLPredictor"]


def image_input(bgr: np.ndarray, input_format: str, augmentation, device) -> Dict:
    """One BGR (H, W, 3) image -> the model's input dict: channels in ``input_format``, resized
    by ``augmentation`` (a detectron2 ``Augmentation``), ``height``/``width`` of the original."""
    if input_format == "RGB":
        bgr = bgr[:, :, ::-1]
    height, width = bgr.shape[:2]
    aug_input = T.AugInput(np.ascontiguousarray(bgr))
    augmentation(aug_input)
    image = torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1)).to(device)
    return {"image": image, "height": height, "width": width}


class LazyPredictor:
    """Like ``DefaultPredictor``: one BGR image (H, W, 3) in, the model's output dict out.

    The model is ``cfg.model`` with the evaluated weights (:mod:`gfocal.model_io.weights`: the
    EMA averages with ``train.model_ema.use_ema_weights_for_eval_only``) of ``checkpoint``
    (default ``cfg.train.init_checkpoint``) on ``device`` (default ``cfg.train.device``); images
    are resized by ``cfg.dataloader.test.mapper.augmentations`` and given to the model in
    ``cfg.dataloader.test.mapper.image_format``.
    """

    def __init__(self, cfg, checkpoint: Optional[str] = None, device: Optional[str] = None,
                 precision: str = "fp32", channels_last: bool = False):
        mapper = cfg.dataloader.test.mapper
        self.input_format = mapper.image_format
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(
                f"dataloader.test.mapper.image_format={self.input_format!r}: LazyPredictor "
                "takes 'RGB' or 'BGR'"
            )
        self.precision = check_precision(precision, "precision")
        self.augmentations = T.AugmentationList(list(instantiate(mapper.augmentations)))
        self.model = instantiate(cfg.model)
        self.model.to(device or cfg.train.device)
        weights = cfg.train.init_checkpoint if checkpoint is None else checkpoint
        self.weights = load_evaluated_weights(cfg, self.model, weights)  # "ema" / "raw"
        prepare_model(self.model, channels_last)

    def __call__(self, original_image: np.ndarray) -> dict:
        check_bgr_image(original_image, "LazyPredictor")
        inputs = image_input(original_image, self.input_format, self.augmentations,
                             next(self.model.parameters()).device)
        return run_detector(self.model, [inputs], self.precision)[0]


class GFLPredictor(DefaultPredictor):
    """detectron2's ``DefaultPredictor`` (YAML config, same outputs) that refuses what it cannot
    read as an (H, W, 3) 0-255 BGR image with a message naming the problem
    (:func:`~gfocal.input_checks.check_bgr_image`), loads ``MODEL.WEIGHTS`` with
    :class:`GFLCheckpointer` (named errors for unreadable files and head mismatches) and predicts
    with the evaluated weights (the EMA averages with ``MODEL_EMA.ENABLED`` and
    ``USE_EMA_WEIGHTS_FOR_EVAL_ONLY``, as evaluation; plain ``DefaultPredictor`` loads the raw
    ones)."""

    def __init__(self, cfg: CfgNode, precision: str = "fp32", channels_last: bool = False):
        no_weights = cfg.clone()
        no_weights.defrost()
        no_weights.MODEL.WEIGHTS = ""
        super().__init__(no_weights)
        self.cfg = cfg.clone()
        self.precision = check_precision(precision, "precision")
        self.weights = load_evaluated_weights(cfg, self.model, cfg.MODEL.WEIGHTS)  # "ema" / "raw"
        prepare_model(self.model, channels_last)

    def __call__(self, original_image: np.ndarray) -> dict:
        check_bgr_image(original_image, "GFLPredictor")
        inputs = image_input(original_image, self.input_format, self.aug, self.cfg.MODEL.DEVICE)
        return run_detector(self.model, [inputs], self.precision)[0]
