"""Ground resolution: GSD from a GeoTIFF, resampled window reads, and the tiled predictor's boxes
mapped back to the image's own pixels and CRS."""
import numpy as np
import pytest
import rasterio
from affine import Affine

from gfocal.inference.reader import ImageReadError, image_gsd, open_image, resample_scale
from gfocal.inference.writers import map_boxes

ORIGIN = (528000.0, 4978000.0)  # UTM 12N, as the YELL images


def _smooth_image(height=260, width=300, seed=0):
    """A smooth RGB uint8 image (a few sinusoids), so resampling errors stay small."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.default_rng(seed)
    bands = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.01, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
        bands.append(127 + 100 * np.sin(fx * xx + phase) * np.cos(fy * yy))
    return np.clip(np.stack(bands, -1), 0, 255).astype(np.uint8)


def _write_geotiff(path, rgb, gsd, crs="EPSG:32612"):
    height, width = rgb.shape[:2]
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=3,
                       dtype="uint8", crs=crs, transform=Affine(gsd, 0, ORIGIN[0], 0, -gsd, ORIGIN[1])) as dst:
        dst.write(rgb.transpose(2, 0, 1))
    return str(path)


def test_gsd_from_transform_and_geographic_crs(tmp_path):
    rgb = _smooth_image(40, 50)
    with open_image(_write_geotiff(tmp_path / "a.tif", rgb, 0.05)) as reader:
        assert image_gsd(reader) == pytest.approx(0.05)
        assert resample_scale(reader, 0.1) == pytest.approx(0.5)
        assert resample_scale(reader, 0.1, gsd=0.2) == pytest.approx(2.0)  # --gsd wins
        assert resample_scale(reader, 0.0) == 1.0  # model GSD unknown: never resampled
    path = tmp_path / "deg.tif"
    with rasterio.open(path, "w", driver="GTiff", height=40, width=50, count=3, dtype="uint8",
                       crs="EPSG:4326", transform=Affine(1e-6, 0, -110.5, 0, -1e-6, 44.9)) as dst:
        dst.write(rgb.transpose(2, 0, 1))
    with open_image(str(path)) as reader:
        with pytest.raises(ImageReadError, match="geographic.*gdalwarp -t_srs"):
            resample_scale(reader, 0.1)
        assert resample_scale(reader, 0.1, gsd=0.1) == 1.0  # --gsd needs no metric CRS


@pytest.mark.parametrize("gsd,match", [(0.0, "--gsd 0.0 must be > 0"), (-0.1, "--gsd -0.1")])
def test_bad_gsd(gsd, match):
    with pytest.raises(ValueError, match=match):
        resample_scale(None, 0.1, gsd=gsd)


def test_gsd_without_model_gsd_and_negative_model_gsd():
    with pytest.raises(ValueError, match="INPUT.GSD is 0"):
        resample_scale(None, 0.0, gsd=0.05)
    with pytest.raises(ValueError, match="INPUT.GSD=-1"):
        resample_scale(None, -1.0)


def test_resampled_window_reads(tmp_path):
    """A 2x nearest-upsampled GeoTIFF read back at half size is the native image exactly
    (rasterio's average of each 2x2 block); a 2x block-averaged one read at double size is close
    to it (bilinear); a PNG through cv2 gives the same."""
    import cv2

    native = _smooth_image()
    up = np.repeat(np.repeat(native, 2, 0), 2, 1)
    with open_image(_write_geotiff(tmp_path / "up.tif", up, 0.05)) as reader:
        view = reader.resampled(260, 300)
        assert (view.height, view.width) == (260, 300)
        assert np.array_equal(view.read(0, 0, 300, 260), native)
        assert np.array_equal(view.read(37, 101, 165, 229), native[101:229, 37:165])
    down = native.reshape(130, 2, 150, 2, 3).mean((1, 3)).round().astype(np.uint8)
    with open_image(_write_geotiff(tmp_path / "down.tif", down, 0.2)) as reader:
        window = reader.resampled(260, 300).read(64, 64, 192, 192).astype(np.float64)
        err = np.abs(window - native[64:192, 64:192])
        assert window.shape == (128, 128, 3) and err.mean() < 3.0
    png = str(tmp_path / "up.png")
    cv2.imwrite(png, up[:, :, ::-1])
    with open_image(png) as reader:
        assert np.array_equal(reader.resampled(260, 300).read(0, 0, 300, 260), native)


@pytest.fixture(scope="module")
def random_predictor():
    """The tree config's model with random weights (no checkpoint needed): deterministic boxes."""
    import torch
    from detectron2.config import get_cfg

    from gfocal import add_gfl_config
    from gfocal.inference import TiledPredictor

    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file("configs/trees/gfl_lite0_trees.yaml")
    cfg.MODEL.EFFICIENTNET_LITE.WEIGHTS = ""
    cfg.MODEL.GFL.BOX_VOTING.ENABLED = False
    cfg.MODEL_EMA.ENABLED = False
    torch.manual_seed(0)
    return TiledPredictor(cfg, weights="", patch_size=128, overlap=32, score_thresh=0.0)


def test_tiled_boxes_mapped_back_to_pixels_and_crs(tmp_path, random_predictor):
    """The same scene at 0.1 m (model's INPUT.GSD) and as a 2x upsampled 0.05 m GeoTIFF: with
    resampling the model sees the same tiles, so the boxes are the native ones times 2 in the
    GeoTIFF's pixels, and the same polygons in the CRS."""
    predictor = random_predictor
    assert predictor.model_gsd == pytest.approx(0.1)
    native = _smooth_image()
    native_path = _write_geotiff(tmp_path / "native.tif", native, 0.1)
    up_path = _write_geotiff(tmp_path / "up.tif", np.repeat(np.repeat(native, 2, 0), 2, 1), 0.05)
    a = predictor(native_path)
    b = predictor(up_path)
    assert len(a.instances) > 10 and b.instances.image_size == (520, 600)
    boxes_a = a.instances.pred_boxes.tensor.numpy()
    boxes_b = b.instances.pred_boxes.tensor.numpy()
    assert np.allclose(boxes_b, 2 * boxes_a, atol=1e-3)
    assert np.allclose(b.instances.scores.numpy(), a.instances.scores.numpy())
    with open_image(native_path) as ra, open_image(up_path) as rb:
        assert np.allclose(map_boxes(boxes_b, rb.transform), map_boxes(boxes_a, ra.transform),
                           atol=1e-3)
    # --gsd on a plain array, and resampling off: the upsampled image seen at its own pixels
    c = predictor(np.repeat(np.repeat(native, 2, 0), 2, 1), gsd=0.05)
    assert np.allclose(c.instances.pred_boxes.tensor.numpy(), boxes_b, atol=1e-3)
    predictor.resample = False
    try:
        d = predictor(up_path)
    finally:
        predictor.resample = True
    assert d.num_tiles > a.num_tiles


def test_negative_model_gsd_refused(random_predictor):
    from gfocal.inference import TiledPredictor

    with pytest.raises(ValueError, match="INPUT.GSD=-0.1"):
        TiledPredictor(model=random_predictor.model, input_format="RGB", patch_size=128,
                       overlap=32, model_gsd=-0.1)


def _masked_geotiff(path, rgb, gsd, kind, left=0.4):
    """``rgb`` as a GeoTIFF whose ``left`` part (of its width) holds no data, declared by a nodata value 0, an alpha
    band or an internal mask; returns the (H, W) bool valid mask."""
    height, width = rgb.shape[:2]
    valid = np.zeros((height, width), dtype=bool)
    valid[:, int(left * width):] = True
    data = rgb.copy()
    data[~valid] = 0
    data[valid] = np.maximum(data[valid], 1)  # no data pixel equals the nodata value
    profile = dict(driver="GTiff", height=height, width=width, count=3 + (kind == "alpha"),
                   dtype="uint8", crs="EPSG:32612",
                   transform=Affine(gsd, 0, ORIGIN[0], 0, -gsd, ORIGIN[1]),
                   **({"nodata": 0} if kind == "nodata" else {}))
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data.transpose(2, 0, 1), [1, 2, 3])
            if kind == "alpha":
                dst.write((valid * 255).astype(np.uint8), 4)
                dst.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                                   rasterio.enums.ColorInterp.blue, rasterio.enums.ColorInterp.alpha]
            elif kind == "mask":
                dst.write_mask((valid * 255).astype(np.uint8))
    return valid


@pytest.mark.parametrize("kind", ["nodata", "alpha", "mask"])
def test_resampled_views_resample_the_nodata_mask(tmp_path, kind):
    """The valid-data mask (nodata value, alpha band, internal mask) of a resampled view is the
    source's, nearest neighbour at the view's pixels, window by window."""
    up = np.repeat(np.repeat(_smooth_image(), 2, 0), 2, 1)  # 520 x 600 at 0.05 m
    path = str(tmp_path / f"{kind}.tif")
    valid = _masked_geotiff(path, up, 0.05, kind)
    with open_image(path) as reader:
        assert reader.has_mask and np.array_equal(reader.read_mask(0, 0, 600, 520), valid)
        view = reader.resampled(260, 300)
        assert view.has_mask and view.dtype == "uint8"
        assert np.array_equal(view.read_mask(0, 0, 300, 260), valid[::2, ::2])
        assert np.array_equal(view.read_mask(100, 30, 228, 158), valid[60:316:2, 200:456:2])
        bigger = reader.resampled(1040, 1200)
        assert np.array_equal(bigger.read_mask(200, 0, 400, 100),
                              np.repeat(np.repeat(valid[0:50, 100:200], 2, 0), 2, 1))


def test_resampled_png_alpha_mask(tmp_path):
    import cv2

    up = np.repeat(np.repeat(_smooth_image(), 2, 0), 2, 1)
    alpha = np.zeros(up.shape[:2], np.uint8)
    alpha[:, 240:] = 255
    cv2.imwrite(str(tmp_path / "a.png"), np.dstack([up[:, :, ::-1], alpha]))
    with open_image(str(tmp_path / "a.png")) as reader:
        view = reader.resampled(260, 300)
        assert view.has_mask
        assert np.array_equal(view.read_mask(0, 0, 300, 260), alpha[::2, ::2] > 0)


def test_nodata_skip_on_resampled_reads(tmp_path, random_predictor):
    """A 0.05 m GeoTIFF whose left half is nodata, predicted at the model's 0.1 m: tiles of the
    resampled view without data are skipped, and no box is centred on nodata."""
    up = np.repeat(np.repeat(_smooth_image(), 2, 0), 2, 1)
    path = str(tmp_path / "alpha.tif")
    valid = _masked_geotiff(path, up, 0.05, "alpha", left=0.5)
    result = random_predictor(path)
    # The 300 x 260 view's 128 px tiles (overlap 32) start at x = 0, 86, 172: the first column
    # lies left of x = 150, so its 3 tiles are skipped.
    assert result.num_skipped == 3 and result.num_tiles == 9
    assert result.instances.image_size == (520, 600)
    boxes = result.instances.pred_boxes.tensor.numpy()
    assert len(boxes)
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2).astype(int).clip(0, 599)
    cy = ((boxes[:, 1] + boxes[:, 3]) / 2).astype(int).clip(0, 519)
    assert valid[cy, cx].all()
