"""The shifts of benchmarks/robustness.py (the robustness table of docs/small_data.md)."""
import os
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
from robustness import SHIFTS, apply_shift  # noqa: E402


def _image():
    rng = np.random.default_rng(0)
    rgb = rng.integers(40, 200, (60, 80, 3)).astype(np.uint8)
    rgb[..., 1] = np.clip(rgb[..., 1].astype(int) + 30, 0, 255)  # coloured, so hue/saturation act
    return rgb, np.array([[10, 10, 30, 40], [50, 5, 70, 20]], dtype=np.float32)


@pytest.mark.parametrize("name", [n for n in SHIFTS if n != "none"])
def test_each_shift_changes_the_image_and_keeps_its_type(name):
    rgb, boxes = _image()
    out, out_boxes = apply_shift(rgb, boxes, *SHIFTS[name])
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape != rgb.shape or np.abs(out.astype(int) - rgb).mean() > 1.0, name
    if SHIFTS[name][0] != "scale":
        assert out.shape == rgb.shape and np.array_equal(out_boxes, boxes)


def test_intensity_shifts_go_the_documented_way():
    rgb, boxes = _image()
    mean = rgb.astype(float).mean()
    assert apply_shift(rgb, boxes, "brightness", 1.2)[0].mean() > mean + 5
    assert apply_shift(rgb, boxes, "brightness", 0.8)[0].mean() < mean - 5
    std = rgb.astype(float).std()
    assert apply_shift(rgb, boxes, "contrast", 1.2)[0].astype(float).std() > std
    assert apply_shift(rgb, boxes, "contrast", 0.8)[0].astype(float).std() < std
    spread = lambda im: (im.max(-1).astype(float) - im.min(-1)).mean()  # noqa: E731
    assert spread(apply_shift(rgb, boxes, "saturation", 0.7)[0]) < spread(rgb)


def test_scale_shift_scales_image_and_boxes_alike():
    rgb, boxes = _image()
    out, out_boxes = apply_shift(rgb, boxes, "scale", 0.75)
    assert out.shape[:2] == (45, 60)
    np.testing.assert_allclose(out_boxes, boxes * 0.75, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown shift"):
        apply_shift(rgb, boxes, "rotate", 1.0)
