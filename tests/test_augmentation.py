"""INPUT.DIHEDRAL_AUGMENTATION (gfocal/data/augmentation.py): exact flips and transposes."""
import numpy as np
from detectron2.config import get_cfg
from detectron2.data import transforms as T

from gfocal import add_gfl_config
from gfocal.data.augmentation import RandomTranspose, TransposeTransform, build_train_augmentation


def test_transpose_image_and_boxes():
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    t = TransposeTransform()
    out = t.apply_image(img)
    assert out.shape == (6, 4, 3) and np.array_equal(out[:, :, 1], img[:, :, 1].T)
    assert t.apply_box(np.array([[1.0, 0.0, 3.0, 2.0]])).tolist() == [[0.0, 1.0, 2.0, 3.0]]
    assert np.array_equal(t.inverse().apply_image(out), img)


def _cfg(dihedral: bool):
    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (40,)
    cfg.INPUT.MAX_SIZE_TRAIN = 40
    cfg.INPUT.DIHEDRAL_AUGMENTATION = dihedral
    return cfg


def test_dihedral_augmentation_keeps_boxes_on_their_pixels():
    augs = build_train_augmentation(_cfg(True))
    assert sum(isinstance(a, T.RandomFlip) for a in augs) == 2
    assert any(isinstance(a, RandomTranspose) for a in augs)
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    img[5:12, 20:33] = 255  # box x 20..33, y 5..12
    seen = set()
    for seed in range(40):
        np.random.seed(seed)
        inp = T.AugInput(img.copy(), boxes=np.array([[20.0, 5.0, 33.0, 12.0]]))
        T.AugmentationList(augs)(inp)
        ys, xs = np.nonzero(inp.image[:, :, 0])
        assert inp.boxes.tolist() == [[xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0]]
        seen.add(tuple(inp.boxes[0].tolist()))
    assert len(seen) == 8  # all 8 symmetries of the square occur


def test_default_is_detectron2s_augmentation():
    augs = build_train_augmentation(_cfg(False))
    assert not any(isinstance(a, RandomTranspose) for a in augs)
    assert sum(isinstance(a, T.RandomFlip) for a in augs) == 1
