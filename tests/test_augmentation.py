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


def test_blur_key_blurs_the_image_and_keeps_the_boxes():
    """INPUT.PHOTOMETRIC.BLUR_SIGMA: OpenCV's Gaussian blur (the robustness benchmark's blur
    shift) after the colour changes, with probability PROB; boxes are unchanged."""
    import cv2

    from gfocal.data.augmentation import GaussianBlurTransform, RandomGaussianBlur

    cfg = _cfg(False)
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.PHOTOMETRIC.BRIGHTNESS = (0.9, 1.1)
    cfg.INPUT.PHOTOMETRIC.BLUR_SIGMA = (1.0, 2.0)
    augs = build_train_augmentation(cfg)
    photo = [a.aug for a in augs if isinstance(a, T.RandomApply)]
    assert [type(a).__name__ for a in photo] == ["RandomBrightness", "RandomGaussianBlur"]
    img = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    boxes = np.array([[5.0, 6.0, 30.0, 31.0]])
    np.random.seed(0)
    inp = T.AugInput(img.copy(), boxes=boxes.copy())
    T.AugmentationList([RandomGaussianBlur(1.0, 2.0)])(inp)
    np.testing.assert_array_equal(inp.boxes, boxes)
    # blurring lowers the pixel-to-pixel variation of a noise image
    assert np.abs(np.diff(inp.image.astype(float), axis=1)).mean() < 0.6 * np.abs(
        np.diff(img.astype(float), axis=1)).mean()
    np.testing.assert_array_equal(
        GaussianBlurTransform(1.5).apply_image(img), cv2.GaussianBlur(img, (0, 0), 1.5))
    assert GaussianBlurTransform(0.0).apply_image(img) is img


def test_bad_augmentation_keys():
    import pytest

    for key, value, match in (
        ("PHOTOMETRIC.CONTRAST", (1.2, 0.8), "INPUT.PHOTOMETRIC.CONTRAST"),
        ("PHOTOMETRIC.PROB", 1.5, "INPUT.PHOTOMETRIC.PROB"),
        ("SCALE_JITTER.TYPE", "lsj", "INPUT.SCALE_JITTER.TYPE"),
        ("PHOTOMETRIC.BLUR_SIGMA", (2.0, 1.0), "INPUT.PHOTOMETRIC.BLUR_SIGMA"),
        ("PHOTOMETRIC.BLUR_SIGMA", (-1.0, 1.0), "INPUT.PHOTOMETRIC.BLUR_SIGMA"),
    ):
        cfg = _cfg(False)
        node, leaf = key.split(".")
        cfg.INPUT[node][leaf] = value
        with pytest.raises(ValueError, match=match):
            build_train_augmentation(cfg)


def _distinct_outputs(augs, img, draws=40):
    seen = set()
    for seed in range(draws):
        np.random.seed(seed)
        inp = T.AugInput(img.copy(), boxes=np.array([[5.0, 5.0, 30.0, 30.0]]))
        T.AugmentationList(augs)(inp)
        seen.add(inp.image.tobytes())
    return seen


def test_finite_variants_give_at_most_k_versions_of_an_image():
    """INPUT.AUG_VARIANTS: photometric and scale draws from K fixed sets per image, so a frozen
    backbone's cache (keyed by the input's pixels) holds them; 0 keeps fresh draws."""
    from gfocal.data.augmentation import FiniteVariants
    from gfocal.modeling.feature_cache import FeatureCache

    cfg = _cfg(False)
    cfg.INPUT.PHOTOMETRIC.BRIGHTNESS = (0.6, 1.4)
    cfg.INPUT.PHOTOMETRIC.CONTRAST = (0.6, 1.4)
    cfg.INPUT.SCALE_JITTER.TYPE = "resize_scale"
    cfg.INPUT.SCALE_JITTER.TARGET_SIZE = 48
    cfg.INPUT.RANDOM_FLIP = "none"
    img = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    assert len(_distinct_outputs(build_train_augmentation(cfg), img)) > 20  # fresh draws
    cfg.INPUT.AUG_VARIANTS = 3
    augs = build_train_augmentation(cfg)
    assert sum(isinstance(a, FiniteVariants) for a in augs) == 2  # scale, photometric
    versions = _distinct_outputs(augs, img)
    assert 1 < len(versions) <= 3 * 3  # K scale draws x K photometric draws of each
    other = np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    assert not versions & _distinct_outputs(augs, other)  # the seed follows the pixels
    # deterministic: the same global seed gives the same output, and the global state moves on
    # as without the wrapper (one draw of k)
    np.random.seed(7)
    a = T.AugInput(img.copy())
    T.AugmentationList(augs)(a)
    after = np.random.randint(1 << 30)
    np.random.seed(7)
    b = T.AugInput(img.copy())
    T.AugmentationList(augs)(b)
    assert np.array_equal(a.image, b.image) and np.random.randint(1 << 30) == after
    # the cache holds one entry per version, within its megabyte cap
    cache = FeatureCache(max_mb=1.0)
    import torch

    def compute(x):
        return {"p3": x.float().mean(dim=1, keepdim=True).repeat(1, 8, 1, 1)}

    for seed in range(40):
        np.random.seed(seed)
        inp = T.AugInput(img.copy())
        T.AugmentationList(augs)(inp)
        cache(torch.as_tensor(inp.image.transpose(2, 0, 1).copy())[None], compute)
    assert len(cache) == len(versions) and cache.hits == 40 - len(versions)
    assert cache.num_bytes <= cache.max_bytes


def test_bad_aug_variants():
    import pytest

    cfg = _cfg(False)
    cfg.INPUT.PHOTOMETRIC.BRIGHTNESS = (0.8, 1.2)
    cfg.INPUT.AUG_VARIANTS = -1
    with pytest.raises(ValueError, match="INPUT.AUG_VARIANTS=-1 must be an integer >= 0"):
        build_train_augmentation(cfg)
