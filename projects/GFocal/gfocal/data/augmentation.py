"""Training augmentations beyond detectron2's defaults, as config keys.

``INPUT.DIHEDRAL_AUGMENTATION``: for overhead imagery (aerial, satellite, microscopy), where up and
down carry no meaning, each training image is flipped horizontally, flipped vertically and
transposed (x <-> y), each with probability 1/2: the 8 symmetries of the square, all exact
(no interpolation), boxes stay tight. It replaces ``INPUT.RANDOM_FLIP``.

``INPUT.PHOTOMETRIC.{BRIGHTNESS,CONTRAST,SATURATION}``: detectron2's ``T.RandomBrightness`` /
``T.RandomContrast`` / ``T.RandomSaturation`` with those (min, max) intensity ranges, each applied
with probability ``INPUT.PHOTOMETRIC.PROB`` (other light, other sites), and ``BLUR_SIGMA``: a
Gaussian blur (:class:`RandomGaussianBlur`; detectron2 has none). ``INPUT.SCALE_JITTER.TYPE
"resize_scale"``: ``T.ResizeScale`` + ``T.FixedSizeCrop`` (large-scale jitter) instead of the
shortest-edge resize; a plain multi-size jitter is detectron2's ``INPUT.MIN_SIZE_TRAIN`` with
several sizes. All off by default. Photometric changes make every training image new: a frozen
backbone's feature cache (``MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB``) then no longer hits,
unless ``INPUT.AUG_VARIANTS`` = K > 0 (:class:`FiniteVariants`): then each training image has at
most K photometric / scale versions, drawn once and for all, which the cache holds like any other
input (at most K x 8 dihedral entries per image, within the cache's megabyte cap).
"""
import hashlib
from typing import List

import cv2
import numpy as np
from detectron2.data import transforms as T
from detectron2.data.detection_utils import build_augmentation

__all__ = [
    "RandomTranspose",
    "TransposeTransform",
    "GaussianBlurTransform",
    "RandomGaussianBlur",
    "FiniteVariants",
    "build_train_augmentation",
]


class TransposeTransform(T.Transform):
    """Swap the x and y axes of the image and of every coordinate (its own inverse)."""

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(img.swapaxes(0, 1))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(coords[:, ::-1])

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def inverse(self) -> T.Transform:
        return self


class RandomTranspose(T.Augmentation):
    """Transpose the image with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        super().__init__()
        self.prob = prob

    def get_transform(self, image) -> T.Transform:
        if self._rand_range() < self.prob:
            return TransposeTransform()
        return T.NoOpTransform()


class GaussianBlurTransform(T.Transform):
    """OpenCV's Gaussian blur of standard deviation ``sigma`` pixels (kernel size from sigma, as
    ``cv2.GaussianBlur(img, (0, 0), sigma)``); coordinates and masks are unchanged."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = float(sigma)

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if self.sigma <= 0:
            return img
        return cv2.GaussianBlur(img, (0, 0), self.sigma)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


class RandomGaussianBlur(T.Augmentation):
    """A Gaussian blur with sigma uniform in [``sigma_min``, ``sigma_max``] pixels."""

    def __init__(self, sigma_min: float, sigma_max: float):
        super().__init__()
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def get_transform(self, image) -> T.Transform:
        return GaussianBlurTransform(np.random.uniform(self.sigma_min, self.sigma_max))


SCALE_JITTER_TYPES = ("", "resize_scale")


class FiniteVariants(T.Augmentation):
    """``augmentations`` with their random parameters drawn from ``num_variants`` fixed sets per
    input image: a variant k in [0, K) is drawn (numpy's global random state, as detectron2's
    augmentations), then the augmentations run with numpy seeded by the image's pixels and k,
    and the global state is restored. The same image and k always give the same output."""

    def __init__(self, augmentations: List[T.Augmentation], num_variants: int):
        super().__init__()
        if not (isinstance(num_variants, int) and num_variants > 0):
            raise ValueError(f"INPUT.AUG_VARIANTS={num_variants!r} must be an integer > 0 here")
        self.augmentations = T.AugmentationList(augmentations)
        self.num_variants = num_variants

    def __call__(self, aug_input) -> T.Transform:
        k = np.random.randint(self.num_variants)
        image = np.ascontiguousarray(aug_input.image)
        digest = hashlib.blake2b(image.tobytes(), digest_size=8)
        digest.update(f"{image.shape}{image.dtype}{k}".encode())
        state = np.random.get_state()
        np.random.seed(int.from_bytes(digest.digest()[:4], "little"))
        try:
            return self.augmentations(aug_input)
        finally:
            np.random.set_state(state)

    def __repr__(self) -> str:
        return f"FiniteVariants({self.augmentations}, num_variants={self.num_variants})"


def build_train_augmentation(cfg) -> List[T.Augmentation]:
    """detectron2's training augmentations (resize, ``INPUT.RANDOM_FLIP``), or with
    ``INPUT.DIHEDRAL_AUGMENTATION`` the resize followed by both flips and a random transpose;
    then the photometric ones of ``INPUT.PHOTOMETRIC`` (module docstring)."""
    augs = build_augmentation(cfg, is_train=True)
    jitter = cfg.INPUT.SCALE_JITTER
    if jitter.TYPE not in SCALE_JITTER_TYPES:
        raise ValueError(
            f"INPUT.SCALE_JITTER.TYPE={jitter.TYPE!r} is not one of {list(SCALE_JITTER_TYPES)}"
        )
    if jitter.TYPE == "resize_scale":
        if not 0 < jitter.MIN_SCALE <= jitter.MAX_SCALE or jitter.TARGET_SIZE <= 0:
            raise ValueError(
                f"INPUT.SCALE_JITTER: need 0 < MIN_SCALE <= MAX_SCALE and TARGET_SIZE > 0, got "
                f"{jitter.MIN_SCALE}, {jitter.MAX_SCALE}, {jitter.TARGET_SIZE}"
            )
        size = jitter.TARGET_SIZE
        scale = [T.ResizeScale(jitter.MIN_SCALE, jitter.MAX_SCALE, size, size),
                 T.FixedSizeCrop((size, size))]
        augs = _variants(cfg, scale) + [a for a in augs if isinstance(a, T.RandomFlip)]
    if cfg.INPUT.DIHEDRAL_AUGMENTATION:
        augs = [a for a in augs if not isinstance(a, T.RandomFlip)] + [
            T.RandomFlip(prob=0.5, horizontal=True, vertical=False),
            T.RandomFlip(prob=0.5, horizontal=False, vertical=True),
            RandomTranspose(prob=0.5),
        ]
    return augs + _variants(cfg, build_photometric_augmentation(cfg))


def _variants(cfg, augs: List[T.Augmentation]) -> List[T.Augmentation]:
    """``augs``, or with ``INPUT.AUG_VARIANTS`` > 0 one :class:`FiniteVariants` of them."""
    k = cfg.INPUT.get("AUG_VARIANTS", 0)
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"INPUT.AUG_VARIANTS={k!r} must be an integer >= 0 (0: fresh draws)")
    return [FiniteVariants(augs, k)] if k and augs else augs


def build_photometric_augmentation(cfg) -> List[T.Augmentation]:
    """``INPUT.PHOTOMETRIC``: brightness, contrast, saturation (those whose range is not
    (1, 1)), then blur (``BLUR_SIGMA`` not (0, 0)), each in a ``T.RandomApply`` with probability
    ``PROB``."""
    photo = cfg.INPUT.PHOTOMETRIC
    if not 0.0 <= photo.PROB <= 1.0:
        raise ValueError(f"INPUT.PHOTOMETRIC.PROB={photo.PROB} must be in [0, 1]")
    augs = []
    for key, cls, off, unit in (
        ("BRIGHTNESS", T.RandomBrightness, (1.0, 1.0), "intensity factors"),
        ("CONTRAST", T.RandomContrast, (1.0, 1.0), "intensity factors"),
        ("SATURATION", T.RandomSaturation, (1.0, 1.0), "intensity factors"),
        ("BLUR_SIGMA", RandomGaussianBlur, (0.0, 0.0), "Gaussian sigma in pixels"),
    ):
        value = tuple(photo.get(key, off))
        if len(value) != 2 or not 0 <= value[0] <= value[1]:
            raise ValueError(
                f"INPUT.PHOTOMETRIC.{key}={value} must be (min, max) with 0 <= min <= max "
                f"({unit}; {off} is off)"
            )
        if value != off:
            augs.append(T.RandomApply(cls(float(value[0]), float(value[1])), prob=photo.PROB))
    return augs
