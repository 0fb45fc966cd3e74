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


def test_photometric_and_scale_jitter_keys():
    cfg = _cfg(True)
    assert not any(isinstance(a, T.RandomApply) for a in build_train_augmentation(cfg))  # off
    cfg.INPUT.PHOTOMETRIC.BRIGHTNESS = (0.5, 1.5)
    cfg.INPUT.PHOTOMETRIC.SATURATION = (0.8, 1.2)
    cfg.INPUT.PHOTOMETRIC.PROB = 0.7
    cfg.INPUT.SCALE_JITTER.TYPE = "resize_scale"
    cfg.INPUT.SCALE_JITTER.TARGET_SIZE = 40
    augs = build_train_augmentation(cfg)
    photo = [a for a in augs if isinstance(a, T.RandomApply)]
    assert [type(a.aug).__name__ for a in photo] == ["RandomBrightness", "RandomSaturation"]
    assert all(a.prob == 0.7 for a in photo)
    assert isinstance(augs[0], T.ResizeScale) and isinstance(augs[1], T.FixedSizeCrop)
    assert any(isinstance(a, RandomTranspose) for a in augs)  # the dihedral flips stay
    img = np.full((40, 40, 3), 100, dtype=np.uint8)
    changed = 0
    for seed in range(10):
        np.random.seed(seed)
        inp = T.AugInput(img.copy(), boxes=np.array([[5.0, 5.0, 20.0, 20.0]]))
        T.AugmentationList(augs)(inp)
        assert inp.image.shape == (40, 40, 3)  # ResizeScale then a 40 px crop / pad
        changed += not np.array_equal(inp.image[10:30, 10:30], img[10:30, 10:30])
    assert changed > 0


def test_bad_augmentation_keys():
    import pytest

    for key, value, match in (
        ("PHOTOMETRIC.CONTRAST", (1.2, 0.8), "INPUT.PHOTOMETRIC.CONTRAST"),
        ("PHOTOMETRIC.PROB", 1.5, "INPUT.PHOTOMETRIC.PROB"),
        ("SCALE_JITTER.TYPE", "lsj", "INPUT.SCALE_JITTER.TYPE"),
    ):
        cfg = _cfg(False)
        node, leaf = key.split(".")
        cfg.INPUT[node][leaf] = value
        with pytest.raises(ValueError, match=match):
            build_train_augmentation(cfg)
