"""The one forward path of the predictors (gfocal/inference/forward.py) and the whole-image
per-tile cap: precision and memory format are options of the model's own forward; thresholds go
through the model's API and are restored; the per-tile cap fits whole images and warns only when
it cuts detections above the score threshold."""
import warnings

import numpy as np
import pytest
import torch

from conftest import tiny_cfg

from gfocal.inference import TiledPredictor
from gfocal.inference.agreement import box_agreement
from gfocal.inference.predictor import GFLPredictor
from gfocal.inference.test_time_augmentation import GFLWithTTA


def _image(seed=0, hw=(256, 256)):
    return np.random.default_rng(seed).integers(0, 255, hw + (3,), dtype=np.uint8)


@pytest.fixture(scope="module")
def cfg():
    # The test-set cap (TEST.DETECTIONS_PER_IMAGE) far below what a random model finds per tile.
    return tiny_cfg(**{"MODEL.GFL.SCORE_THRESH_TEST": 0.0, "TEST.DETECTIONS_PER_IMAGE": 5})


@pytest.fixture(scope="module")
def tiled(cfg):
    torch.manual_seed(0)
    return TiledPredictor(cfg, patch_size=256, overlap=64)


def test_whole_images_do_not_use_the_test_set_cap(tiled):
    """Issue: 57 of 64 tiles reached the model's 100 detections per tile; the cap of a test image
    is not one for a tile of a whole image."""
    assert tiled.tile_max_dets == 1000
    (found,) = tiled.predict_tiles([_image()])
    assert len(found) > 5
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*per-tile cap")  # nothing was cut
        result = tiled(_image(1, (256, 400)))
    assert result.tiles_at_cap == 0
    assert tiled.model.max_detections_per_image == 5  # the model's own value, restored


def test_per_tile_cap_warns_only_when_it_cuts_detections(cfg, tiled):
    image = _image(2)
    n = len(tiled.predict_tiles([image])[0])
    exact = TiledPredictor(model=tiled.model, input_format="BGR", patch_size=256, overlap=64,
                           tile_max_dets=n)
    with warnings.catch_warnings():
        # exactly n above the threshold: the cap cut nothing
        warnings.filterwarnings("error", message=".*per-tile cap")
        assert exact(image).tiles_at_cap == 0
    below = TiledPredictor(model=tiled.model, input_format="BGR", patch_size=256, overlap=64,
                           tile_max_dets=n - 1)
    with pytest.warns(UserWarning, match=rf"per-tile cap of {n - 1} detections \(--tile-max-dets\)"):
        result = below(image)
    assert result.tiles_at_cap == 1 and len(below.predict_tiles([image])[0]) == n - 1
    with pytest.raises(ValueError, match="--tile-max-dets 0 must be >= 1"):
        TiledPredictor(model=tiled.model, input_format="BGR", patch_size=256, overlap=64,
                       tile_max_dets=0)


def test_score_threshold_is_the_predictors_not_a_change_of_the_model(tiled):
    model = tiled.model
    strict = TiledPredictor(model=model, input_format="BGR", patch_size=256, overlap=64,
                            score_thresh=0.5)
    assert strict.score_thresh == 0.5 and model.test_score_thresh == 0.0
    found = strict.predict_tiles([_image()])[0]
    assert (found.scores > 0.5).all() and model.test_score_thresh == 0.0


def _head_dtypes(model):
    dtypes = []
    handle = model.head.cls_score.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    return dtypes, handle


def test_bf16_is_an_option_of_every_predictor(cfg, tiled):
    """GFLPredictor, the TTA wrapper and TiledPredictor run the model's forward under bf16
    autocast (head convolutions in bf16); decoding gives float32 boxes and scores."""
    model = tiled.model
    bf16 = TiledPredictor(model=model, input_format="BGR", patch_size=256, overlap=64,
                          precision="bf16", backend="torch")
    dtypes, handle = _head_dtypes(model)
    try:
        found = bf16.predict_tiles([_image()])[0]
        assert set(dtypes) == {torch.bfloat16}
        assert found.pred_boxes.tensor.dtype == torch.float32 and found.scores.dtype == torch.float32
        ref = tiled.predict_tiles([_image()])[0]
        # bf16 rounding moves boxes a little; most still overlap their fp32 box closely
        assert box_agreement(ref.pred_boxes.tensor[:50], found.pred_boxes.tensor, iou=0.5) > 0.5

        predictor = GFLPredictor(cfg, precision="bf16")
        d2, h2 = _head_dtypes(predictor.model)
        out = predictor(_image())["instances"]
        h2.remove()
        assert set(d2) == {torch.bfloat16} and out.scores.dtype == torch.float32

        dtypes.clear()
        tta_cfg = cfg.clone()
        tta_cfg.TEST.AUG.MIN_SIZES = (256,)
        image = torch.as_tensor(_image().transpose(2, 0, 1).astype("float32"))
        GFLWithTTA(tta_cfg, model, precision="bf16")([{"image": image}])
        assert dtypes and set(dtypes) == {torch.bfloat16}
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="--precision 'fp16' must be one of"):
        TiledPredictor(model=model, input_format="BGR", patch_size=256, overlap=64, precision="fp16")


def test_channels_last_gives_the_fp32_detections(cfg):
    torch.manual_seed(0)
    plain = TiledPredictor(cfg, patch_size=256, overlap=64, channels_last=False)
    torch.manual_seed(0)
    nhwc = TiledPredictor(cfg, patch_size=256, overlap=64, channels_last=True)
    weight = nhwc.model.head.cls_score.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and weight.shape[-1] > 1
    a, b = plain.predict_tiles([_image()])[0], nhwc.predict_tiles([_image()])[0]
    assert len(a) == len(b)
    assert box_agreement(a.pred_boxes.tensor, b.pred_boxes.tensor, iou=0.99) >= 0.99


def test_device_defaults_fill_unset_options(cfg, tiled):
    from gfocal.inference.tiled import DEVICE_DEFAULTS

    default = TiledPredictor(model=tiled.model, input_format="BGR", patch_size=256, overlap=64)
    cpu = DEVICE_DEFAULTS["cpu"]
    assert default.backend_name == cpu["backend"]  # openvino is pinned in requirements.txt
    assert (default.batch_size, default.precision, default.channels_last) == (
        cpu["batch_size"], cpu["precision"], False)  # a runtime picks its own layout
    torch_default = TiledPredictor(model=tiled.model, input_format="BGR", patch_size=256,
                                   overlap=64, backend="torch")
    assert torch_default.channels_last == cpu["channels_last"]
    nhwc = TiledPredictor(model=tiled.model, input_format="BGR", patch_size=256, overlap=64,
                          channels_last=True)
    assert (nhwc.backend_name, nhwc.channels_last) == ("torch", True)
    chosen = TiledPredictor(model=tiled.model, input_format="BGR", patch_size=256, overlap=64,
                            batch_size=3)
    assert chosen.batch_size == 3
