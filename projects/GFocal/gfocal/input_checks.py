"""Checks of the images given to a predictor or to the model at inference.

Detectron2's predictors take an (H, W, 3) uint8 BGR array as ``cv2.imread`` returns it, and its
models an image tensor with values in 0-255 (``MODEL.PIXEL_MEAN`` is in that range). Neither
checks: a float image in [0, 1] gives many meaningless detections, NaN or inf pixels none, and a
2-D grey array a NumPy error about axes. These checks name the problem and the expected format.
"""
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_bgr_image", "check_model_images", "EXPECTED_FORMAT", "MODEL_FORMAT"]

EXPECTED_FORMAT = "an (H, W, 3) BGR image with values 0-255 (uint8, as cv2.imread returns it)"
MODEL_FORMAT = ("(C, H, W) image tensors with values 0-255 (a predictor makes them from "
                f"{EXPECTED_FORMAT})")


def _unit_range_warning(where: str, max_value: float) -> None:
    warnings.warn(
        f"{where}: every pixel value is at most {max_value:g}: the image looks scaled to [0, 1], "
        f"but the model expects {MODEL_FORMAT}; multiply by 255 (e.g. "
        "(image * 255).astype(np.uint8)), or its detections are meaningless",
        UserWarning,
        stacklevel=3,
    )


def check_bgr_image(image: np.ndarray, where: str = "predictor") -> None:
    """Refuse what a predictor cannot read as :data:`EXPECTED_FORMAT`: not an array, a 2-D grey
    array, another channel count, an empty image, NaN or inf pixels. Values in [0, 1] are left to
    :func:`check_model_images` (which warns), so that the warning is given once."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{where} takes {EXPECTED_FORMAT}, got a {type(image).__name__}")
    if image.ndim == 2:
        raise ValueError(
            f"{where} takes {EXPECTED_FORMAT}, got a 2-D (H, W) array of shape {image.shape} "
            "(a grey image?); convert it with cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where} takes {EXPECTED_FORMAT}, got an array of shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{where}: the image is empty (shape {image.shape})")
    if np.issubdtype(image.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(image)))
        if bad:
            raise ValueError(
                f"{where}: {bad} of the image's {image.size} values are NaN or infinite; it "
                f"takes {EXPECTED_FORMAT}"
            )
    elif not (np.issubdtype(image.dtype, np.integer) or image.dtype == np.bool_):
        raise TypeError(f"{where} takes {EXPECTED_FORMAT}, got dtype {image.dtype}")


def check_model_images(
    images: Sequence[Tensor], pixel_mean: Optional[Tensor] = None, where: str = "GFL inference"
) -> None:
    """Refuse float images with NaN or inf values and warn about float images whose values are
    all in [0, 1] unless the model's ``pixel_mean`` is in that range too (a model trained so).
    Integer images are left alone. One host sync for the whole batch; nothing while tracing."""
    floats = [x for x in images if x.is_floating_point() and x.numel()]
    if not floats or torch.jit.is_tracing():
        return
    stats = torch.stack([
        torch.stack([(~torch.isfinite(x)).sum().float(),
                     torch.where(torch.isfinite(x), x, x.new_zeros(())).amax().float()])
        for x in floats
    ]).tolist()
    pixel_mean_max = 255.0 if pixel_mean is None else float(pixel_mean.max())
    for i, (num_bad, max_value) in enumerate(stats):
        if num_bad:
            raise ValueError(
                f"{where}: image {i} of the batch has {int(num_bad)} NaN or infinite values; the "
                f"model takes {MODEL_FORMAT}"
            )
        if 0.0 < max_value <= 1.0 < pixel_mean_max:
            _unit_range_warning(f"{where}: image {i} of the batch", max_value)
