"""Training augmentations beyond detectron2's defaults, as config keys.

``INPUT.DIHEDRAL_AUGMENTATION``: for overhead imagery (aerial, satellite, microscopy), where up and
down carry no meaning, each training image is flipped horizontally, flipped vertically and
transposed (x <-> y), each with probability 1/2: the 8 symmetries of the square, all exact
(no interpolation), boxes stay tight. It replaces ``INPUT.RANDOM_FLIP``.
"""
from typing import List

import numpy as np
from detectron2.data import transforms as T
from detectron2.data.detection_utils import build_augmentation

__all__ = ["RandomTranspose", "TransposeTransform", "build_train_augmentation"]


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


def build_train_augmentation(cfg) -> List[T.Augmentation]:
    """detectron2's training augmentations (resize, ``INPUT.RANDOM_FLIP``), or with
    ``INPUT.DIHEDRAL_AUGMENTATION`` the resize followed by both flips and a random transpose."""
    if not cfg.INPUT.DIHEDRAL_AUGMENTATION:
        return build_augmentation(cfg, is_train=True)
    resize = [a for a in build_augmentation(cfg, is_train=True) if not isinstance(a, T.RandomFlip)]
    return resize + [
        T.RandomFlip(prob=0.5, horizontal=True, vertical=False),
        T.RandomFlip(prob=0.5, horizontal=False, vertical=True),
        RandomTranspose(prob=0.5),
    ]
