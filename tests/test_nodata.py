"""Nodata and alpha in whole images: masks read per window, tiles without data skipped, boxes
centred on nodata dropped, bad nodata values refused, unreadable inputs skipped on request."""
import csv
import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, tiny_cfg

from gfocal.inference import ArrayReader, TiledPredictor, open_image, tile_windows
from gfocal.inference.nodata import NodataFilter, box_centres_valid, check_nodata_value

rasterio = pytest.importorskip("rasterio")  # pinned in requirements.txt: present in CI
from rasterio.enums import ColorInterp  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

from detectron2.structures import Boxes, Instances  # noqa: E402


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("benchmarks/nodata_skip.py", "nodata_skip_bench")


class SquareDetector(TiledPredictor):
    """Finds bright squares in channel 0 of each tile it is given, and records the tiles it ran."""

    def __init__(self, **kwargs):
        model = torch.nn.Module()
        model.strides, model.test_nms_thresh, model.max_detections_per_image = [8], 0.5, 1000
        model.test_score_thresh = 0.0
        super().__init__(model=model, input_format="RGB", **kwargs)
        self.tiles_run = 0

    def run_tiles(self, tiles):
        import cv2

        out = []
        for tile in tiles:
            self.tiles_run += 1
            count, _, stats, _ = cv2.connectedComponentsWithStats((tile[:, :, 0] > 128).astype(np.uint8))
            inst = Instances(tile.shape[:2])
            inst.pred_boxes = Boxes(torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:count]],
                                                 dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.ones(count - 1)
            inst.pred_classes = torch.zeros(count - 1, dtype=torch.long)
            out.append(inst)
        return out, [False] * len(out)


def _expected_mask(size, border):
    lo, hi = bench.valid_square(size, border)
    mask = np.zeros((size, size), dtype=bool)
    mask[lo:hi, lo:hi] = True
    return mask


@pytest.mark.parametrize("kind", ["nodata", "alpha", "mask"])
def test_the_benchmark_geotiff_has_a_40_percent_border_read_window_by_window(tmp_path, kind):
    path = str(tmp_path / f"{kind}.tif")
    fraction = bench.write_border_geotiff(path, 600, 0.4, kind, block=256)
    expected = _expected_mask(600, 0.4)
    assert fraction == pytest.approx(0.4, abs=0.01) and 1 - expected.mean() == pytest.approx(fraction)
    with open_image(path) as reader:
        assert reader.has_mask
        assert np.array_equal(reader.read_mask(0, 0, 600, 600), expected)
        assert np.array_equal(reader.read_mask(50, 20, 350, 300), expected[20:300, 50:350])
        assert reader.read(0, 0, 600, 600).shape == (600, 600, 3)  # the alpha band is not a colour
    plain = str(tmp_path / "plain.tif")
    with rasterio.open(plain, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8",
                       crs="EPSG:32612", transform=from_origin(541000, 4977000, 0.1, 0.1)) as dst:
        dst.write(np.zeros((3, 64, 64), dtype=np.uint8))  # all 0 but no nodata declared
    with open_image(plain) as reader:
        assert not reader.has_mask and reader.read_mask(0, 0, 64, 64) is None


def _squares_geotiff(path, squares, size=700, valid=(300, 300, 700, 700)):
    """A GeoTIFF with an alpha band: data only inside ``valid`` (XYXY), bright squares anywhere
    (under alpha 0 they are no data)."""
    rgb = np.zeros((3, size, size), dtype=np.uint8)
    for x0, y0, x1, y1 in squares:
        rgb[:, y0:y1, x0:x1] = 255
    alpha = np.zeros((size, size), dtype=np.uint8)
    x0, y0, x1, y1 = valid
    alpha[y0:y1, x0:x1] = 255
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=4, dtype="uint8",
                       crs="EPSG:32612", transform=from_origin(541000, 4977000, 0.1, 0.1)) as dst:
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
        dst.write(np.concatenate([rgb, alpha[None]]))
    mask = alpha > 0
    return mask


def test_tiles_without_data_are_not_read_nor_run_and_boxes_on_nodata_are_dropped(tmp_path):
    # Data in x, y >= 300 only. Squares: inside the data; in the nodata corner; straddling the
    # edge with the centre on nodata (x centre 290); straddling with the centre on data (310).
    squares = [(400, 400, 440, 440), (20, 20, 60, 60), (270, 400, 310, 440), (290, 500, 330, 540)]
    path = str(tmp_path / "alpha.tif")
    mask = _squares_geotiff(path, squares)
    grid = tile_windows((700, 700), 256, 80)
    with_data = [i for i, (x0, y0, x1, y1) in enumerate(grid) if mask[y0:y1, x0:x1].any()]
    assert 0 < len(with_data) < len(grid)

    detector = SquareDetector(patch_size=256, overlap=80)
    with open_image(path) as reader:
        read_windows = []
        read = reader.read
        reader.read = lambda *w: read_windows.append(w) or read(*w)
        result = detector(reader)
    assert detector.tiles_run == len(with_data) and result.num_skipped == len(grid) - len(with_data)
    assert result.num_tiles == len(grid)
    no_data_tiles = {tuple(int(v) for v in grid[i]) for i in range(len(grid)) if i not in with_data}
    assert not no_data_tiles & set(read_windows)  # only their mask was read
    got = sorted(map(tuple, result.instances.pred_boxes.tensor.round().int().tolist()))
    assert got == sorted([squares[0], squares[3]])

    everything = SquareDetector(patch_size=256, overlap=80, skip_nodata=False)
    with open_image(path) as reader:
        all_boxes = everything(reader)
    assert everything.tiles_run == len(grid) and all_boxes.num_skipped == 0
    assert len(all_boxes.instances) == len(squares)


def test_a_declared_nodata_value_marks_black_borders_without_a_tag():
    image = np.zeros((600, 600, 3), dtype=np.uint8)
    image[300:, 300:] = 90  # data: the lower right; the rest black, no tag (an in-memory array)
    image[400:440, 400:440] = 255
    image[320:360, 100:140, 0] = 255  # red square in the black part: it is data (not all bands 0)
    grid = tile_windows((600, 600), 256, 80)
    valid = (image != 0).any(-1)
    with_data = sum(valid[y0:y1, x0:x1].any() for x0, y0, x1, y1 in grid)
    detector = SquareDetector(patch_size=256, overlap=80, nodata=0)
    result = detector(image)
    assert detector.tiles_run == with_data < len(grid)
    assert len(result.instances) == 2
    reader = ArrayReader(image)
    assert NodataFilter(reader).active is False  # nothing declared: nothing read, nothing skipped
    assert np.array_equal(NodataFilter(reader, 0).window_mask((0, 0, 600, 600)), valid)


def test_png_alpha_is_a_mask(tmp_path):
    import cv2

    bgra = np.full((300, 400, 4), 120, dtype=np.uint8)
    bgra[:, :150, 3] = 0
    path = str(tmp_path / "ortho.png")
    cv2.imwrite(path, bgra)
    with open_image(path) as reader:
        assert reader.has_mask and reader.read(0, 0, 400, 300).shape == (300, 400, 3)
        assert np.array_equal(reader.read_mask(100, 0, 200, 300), bgra[:, 100:200, 3] > 0)
    cv2.imwrite(str(tmp_path / "rgb.png"), bgra[:, :, :3])
    with open_image(str(tmp_path / "rgb.png")) as reader:
        assert not reader.has_mask and reader.read_mask(0, 0, 10, 10) is None


def test_box_centres_on_the_mask():
    mask = np.zeros((100, 100), dtype=bool)
    mask[:, 50:] = True
    boxes = torch.tensor([[40.0, 0, 58, 10], [40.0, 0, 62, 10], [90, 90, 120, 120], [0, 0, 10, 10]])
    assert box_centres_valid(boxes, mask).tolist() == [False, True, True, False]


def test_nodata_values_outside_the_band_type_are_refused(tmp_path):
    for value, why in [(300, r"outside the range of the band type uint8 \[0, 255\]"),
                       (-1, "outside the range"), (1.5, "not an integer")]:
        with pytest.raises(ValueError, match=f"--nodata {value:g} is {why}"):
            check_nodata_value(value, "uint8", "a.tif")
    check_nodata_value(0.0)
    with pytest.raises(ValueError, match="--nodata 256"):
        TiledPredictor(tiny_cfg(), patch_size=256, overlap=64, nodata=256)


def _tiny_config_file(tmp_path) -> str:
    cfg = tiny_cfg(**{"MODEL.GFL.SCORE_THRESH_TEST": 0.0, "TEST.DETECTIONS_PER_IMAGE": 20,
                      "DATASETS.TEST": ()})
    path = str(tmp_path / "tiny.yaml")
    with open(path, "w") as f:
        f.write(cfg.dump())
    return path


def _write_rgb_geotiff(path, rgb, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", driver="GTiff", width=rgb.shape[1], height=rgb.shape[0], count=3,
                           dtype="uint8", crs="EPSG:32612", transform=from_origin(541000, 4977000, 0.1, 0.1),
                           **extra) as dst:
            dst.write(rgb.transpose(2, 0, 1))


def test_cli_bad_nodata_bad_device_count_and_unreadable_files(tmp_path):
    predict = _load("tools/predict.py", "predict_tool_nodata").main
    config = _tiny_config_file(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    rgb = np.random.default_rng(0).integers(1, 255, (256, 300, 3), dtype=np.uint8)
    good = str(images / "good.tif")
    _write_rgb_geotiff(good, rgb)
    base = ["--config-file", config, "--patch-size", "256", "--overlap", "64"]

    with pytest.raises(SystemExit, match=r"--nodata 300 is outside the range of the band type uint8 \[0, 255\] "
                                         r"\(the bands of .*good.tif\)"):
        predict(base + ["--output", str(tmp_path / "o1"), "--nodata", "300", good])
    # A file whose own nodata tag no uint8 pixel can take (GDAL ignores it): named, unless --nodata.
    tagged = str(tmp_path / "tagged.tif")
    _write_rgb_geotiff(tagged, rgb, nodata=0)
    with rasterio.open(tagged, "r+") as dst:
        dst.nodata = 300
    with pytest.raises(SystemExit, match=r"tagged.tif: its nodata value 300 is outside the range of the band "
                                         r"type uint8 .*pass --nodata VALUE"):
        predict(base + ["--output", str(tmp_path / "o2"), tagged])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()

    present = torch.cuda.device_count()
    with pytest.raises(SystemExit, match=f"--num-gpus {present + 1} is greater than the {present} CUDA device"):
        predict(base + ["--output", str(tmp_path / "o3"), "--device", "cuda", "--num-gpus", str(present + 1), good])
    with pytest.raises(SystemExit, match="--num-gpus 0 must be >= 1"):
        predict(base + ["--output", str(tmp_path / "o3"), "--num-gpus", "0", good])

    # A TIFF cut in half: it opens, and fails on its missing blocks in the middle of prediction.
    full = str(tmp_path / "full.tif")
    with rasterio.open(full, "w", driver="GTiff", width=512, height=256, count=3, dtype="uint8", tiled=True,
                       blockxsize=256, blockysize=256, crs="EPSG:32612",
                       transform=from_origin(541000, 4977000, 0.1, 0.1)) as dst:
        dst.write(np.random.default_rng(1).integers(0, 255, (3, 256, 512), dtype=np.uint8))
    data = open(full, "rb").read()
    (images / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match=r"cut.tif: window \(\d+, \d+, \d+, \d+\) cannot be read"):
        predict(base + ["--output", str(tmp_path / "o5"), str(images)])
    assert not (tmp_path / "o5" / "detections.csv").exists()

    # A folder with a corrupt file too: refused whole by default, both skipped and listed on request.
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="broken.png: cannot be decoded as an image"):
        predict(base + ["--output", str(out), str(images)])
    assert not out.exists()
    assert predict(base + ["--output", str(out), "--skip-unreadable", str(images)]) == 0
    with open(out / "skipped_inputs.csv") as f:
        skipped = {os.path.basename(r["path"]): r["error"] for r in csv.DictReader(f)}
    assert sorted(skipped) == ["broken.png", "cut.tif"]
    assert "cannot be decoded as an image" in skipped["broken.png"] and "cannot be read" in skipped["cut.tif"]
    with open(out / "detections.csv") as f:
        assert {r["image_path"] for r in csv.DictReader(f)} == {"good.tif"}
    with pytest.raises(SystemExit, match="none of the 1 inputs can be read"):
        predict(base + ["--output", str(tmp_path / "o4"), "--skip-unreadable", str(images / "broken.png")])
