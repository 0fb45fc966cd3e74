"""Whole-image (tiled) prediction: seams, geo coordinates, SAHI agreement, bad input, outputs."""
import csv
import json
import os
import warnings

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, tiny_cfg

from gfocal.inference import ArrayReader, TiledPredictor, open_image, tile_windows
from gfocal.inference.merge import merge_detections
from gfocal.inference.reader import ImageReadError
from gfocal.inference.writers import atomic_open, map_boxes, write_geojson

rasterio = pytest.importorskip("rasterio")  # pinned in requirements.txt: present in CI
from rasterio.crs import CRS  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

from detectron2.structures import Boxes, Instances  # noqa: E402


@pytest.fixture(scope="module")
def tiny_predictor():
    """A small random GFL (ResNet-18, P3-P7: coarsest stride 128) on 256 px patches."""
    torch.manual_seed(0)
    cfg = tiny_cfg(**{"MODEL.GFL.SCORE_THRESH_TEST": 0.0, "TEST.DETECTIONS_PER_IMAGE": 50})
    return TiledPredictor(cfg, patch_size=256, overlap=64, batch_size=4)


class SquareDetector(TiledPredictor):
    """A perfect 'detector' of bright squares that sees only its tile: a square cut by the tile
    edge comes out as a truncated box, as a real detector's would (score: visible area)."""

    def __init__(self, **kwargs):
        model = torch.nn.Module()
        model.strides, model.test_nms_thresh, model.max_detections_per_image = [8], 0.5, 1000
        model.test_score_thresh = 0.0
        super().__init__(model=model, input_format="RGB", **kwargs)

    def run_tiles(self, tiles):
        import cv2

        out = []
        for tile in tiles:
            count, _, stats, _ = cv2.connectedComponentsWithStats((tile[:, :, 0] > 128).astype(np.uint8))
            boxes = [[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:count]]
            inst = Instances(tile.shape[:2])
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.tensor([a / 2500.0 for *_, a in stats[1:count]], dtype=torch.float32)
            inst.pred_classes = torch.zeros(len(boxes), dtype=torch.long)
            out.append(inst)
        return out, [False] * len(out)


def _squares_image(squares, size=(700, 700)):
    image = np.zeros(size + (3,), dtype=np.uint8)
    for x0, y0, x1, y1 in squares:
        image[y0:y1, x0:x1] = 255
    return image


def test_grid_covers_the_image_and_bad_tiling_is_refused():
    windows = tile_windows((700, 1000), 256, 64)
    assert windows[:, 2].max() == 1000 and windows[:, 3].max() == 700 and windows.min() == 0
    assert ((windows[:, 2:] - windows[:, :2]) == 256).all()
    xs = np.unique(windows[:, 0])
    assert (np.diff(xs) <= 256 - 64).all()  # neighbours overlap by at least 64 px
    with pytest.raises(ValueError, match="--patch-size 64 is below the model's coarsest stride 128"):
        TiledPredictor(tiny_cfg(), patch_size=64, overlap=0)
    with pytest.raises(ValueError, match=r"--overlap 256 must be in \[0, --patch-size 256\)"):
        TiledPredictor(tiny_cfg(), patch_size=256, overlap=256)


def test_merge_at_seams_gives_each_square_once_and_whole():
    # Squares across the vertical seam, the horizontal seam, a corner of four tiles, and inside.
    windows = tile_windows((700, 700), 256, 80)
    # Tile edges per axis at 0, 148, 256, 296, 404, 444, 552, 700.
    squares = [(230, 40, 280, 90), (30, 125, 80, 175), (380, 380, 425, 425), (320, 310, 360, 350),
               (640, 600, 690, 650)]
    seams = {int(v) for v in windows[:, 0]} | {int(v) for v in windows[:, 2]}
    assert any(x0 < s < x1 for s in seams for x0, _, x1, _ in squares)  # some are really cut
    result = SquareDetector(patch_size=256, overlap=80)(_squares_image(squares))
    boxes = result.instances.pred_boxes.tensor.numpy()
    assert len(boxes) == len(squares)
    got = sorted(map(tuple, boxes.round().astype(int).tolist()))
    assert got == sorted(squares)
    # NMS alone keeps truncated copies beside the whole box (IoU below the NMS threshold).
    nms_only = SquareDetector(patch_size=256, overlap=80, edge_margin=-1)(_squares_image(squares))
    assert len(nms_only.instances) > len(squares)


def test_seam_rule_keeps_an_object_no_tile_sees_whole():
    big = [(100, 100, 400, 150)]  # 300 px wide: no 256 px patch holds it
    result = SquareDetector(patch_size=256, overlap=80)(_squares_image(big))
    assert len(result.instances) >= 1  # its cut parts are kept (NMS leaves the ones that differ)


def test_merge_caps_detections_and_reports_it():
    boxes = torch.tensor([[10.0 * i, 0, 10.0 * i + 8, 8] for i in range(20)])
    grid = torch.tensor([[0.0, 0, 256, 256]])
    kept, scores, _, found = merge_detections(
        boxes, torch.linspace(1, 0.1, 20), torch.zeros(20, dtype=torch.long), grid.expand(20, 4),
        grid, (256, 256), 0.5, max_dets=5,
    )
    assert found == 20 and len(kept) == 5 and torch.allclose(scores, torch.linspace(1, 0.1, 20)[:5])
    predictor = SquareDetector(patch_size=256, overlap=80, max_dets=2)
    with pytest.warns(UserWarning, match="kept the best 2"):
        result = predictor(_squares_image([(10, 10, 30, 30), (100, 100, 130, 130), (300, 300, 320, 320)]))
    assert result.capped and len(result.instances) == 2


def test_batched_tiles_match_one_tile_at_a_time(tiny_predictor):
    image = np.random.default_rng(0).integers(0, 255, (400, 448, 3), dtype=np.uint8)
    batched = tiny_predictor(image).instances
    tiny_predictor.batch_size = 1
    try:
        single = tiny_predictor(image).instances
    finally:
        tiny_predictor.batch_size = 4
    assert len(batched) == len(single)
    assert torch.allclose(batched.pred_boxes.tensor, single.pred_boxes.tensor, atol=1e-2)
    assert torch.allclose(batched.scores, single.scores, atol=1e-5)


def test_sahi_sliced_prediction_agrees_with_ours(tiny_predictor):
    from sahi.predict import get_sliced_prediction
    from sahi.slicing import get_slice_bboxes

    from gfocal.inference.sahi_model import GFLDetectionModel

    image = np.random.default_rng(1).integers(0, 255, (420, 520, 3), dtype=np.uint8)
    model = GFLDetectionModel(model=tiny_predictor, confidence_threshold=0.0, device="cpu")
    sahi = get_sliced_prediction(
        image, model, slice_height=256, slice_width=256, overlap_height_ratio=0.25,
        overlap_width_ratio=0.25, perform_standard_pred=False, postprocess_type="NMS",
        postprocess_match_metric="IOU", postprocess_match_threshold=tiny_predictor.model.test_nms_thresh,
        verbose=0, batch_size=4,
    ).object_prediction_list
    windows = np.asarray(get_slice_bboxes(420, 520, 256, 256, False, 0.25, 0.25))
    tiny_predictor.edge_margin = -1.0  # NMS only, SAHI's merge
    try:
        ours = tiny_predictor(image, windows=windows).instances
    finally:
        tiny_predictor.edge_margin = 2.0
    theirs = np.array([p.bbox.to_xyxy() for p in sahi])
    their_scores = np.array([p.score.value for p in sahi])
    assert len(theirs) == len(ours) > 50
    order = np.argsort(-their_scores, kind="stable")
    # Same boxes in the same score order (ties aside): compare as sets matched by nearest box.
    mine = ours.pred_boxes.tensor.numpy()
    dist = np.abs(theirs[order][:, None, :] - mine[None, :, :]).max(-1)
    assert (dist.min(1) < 0.05).mean() > 0.98
    assert np.allclose(np.sort(their_scores), np.sort(ours.scores.numpy()), atol=1e-4)


def _write_geotiff(path, rgb, crs="EPSG:32612", transform=None):
    profile = dict(driver="GTiff", width=rgb.shape[1], height=rgb.shape[0], count=3, dtype="uint8",
                   tiled=True, blockxsize=256, blockysize=256)
    if crs is not None:
        profile.update(crs=CRS.from_string(crs), transform=transform)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rgb.transpose(2, 0, 1))


def test_geojson_boxes_in_the_image_crs(tmp_path):
    # A NEON-like tile: UTM zone 12N (EPSG:32612), 10 cm pixels, top-left corner (541000, 4977000).
    rgb = np.random.default_rng(2).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    path = str(tmp_path / "tile.tif")
    _write_geotiff(path, rgb, transform=from_origin(541000.0, 4977000.0, 0.1, 0.1))
    with open_image(path) as reader:
        assert reader.georeferenced and reader.crs.to_epsg() == 32612
        assert np.array_equal(reader.read(50, 20, 150, 90), rgb[20:90, 50:150])
        transform = reader.transform
    # Pixel box x 100..150, y 200..260: map x = 541000 + 0.1 x, map y = 4977000 - 0.1 y.
    ring = map_boxes(np.array([[100.0, 200.0, 150.0, 260.0]]), transform)[0]
    expected = [[541010.0, 4976980.0], [541015.0, 4976980.0], [541015.0, 4976974.0], [541010.0, 4976974.0]]
    assert np.allclose(ring, expected, atol=1e-6)
    out = str(tmp_path / "tile.geojson")
    row = {"image_path": "tile.tif", "label": "Tree", "score": 0.9}
    write_geojson(out, [row], np.array([[100.0, 200.0, 150.0, 260.0]]), CRS.from_epsg(32612), transform)
    with open(out) as f:
        collection = json.load(f)
    assert collection["crs"]["properties"]["name"] == "EPSG:32612"
    polygon = collection["features"][0]["geometry"]["coordinates"][0]
    assert np.allclose(polygon, expected + [expected[0]]) and not os.path.exists(out + ".tmp")


def _tiny_config_file(tmp_path) -> str:
    cfg = tiny_cfg(**{"MODEL.GFL.SCORE_THRESH_TEST": 0.0, "TEST.DETECTIONS_PER_IMAGE": 20,
                      "DATASETS.TEST": ()})
    path = str(tmp_path / "tiny.yaml")
    with open(path, "w") as f:
        f.write(cfg.dump())
    return path


def _predict_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("predict_tool", os.path.join(REPO_ROOT, "tools", "predict.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_cli_writes_all_outputs_and_handles_bad_input(tmp_path):
    predict = _predict_tool().main
    config = _tiny_config_file(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    rgb = np.random.default_rng(3).integers(0, 255, (256, 380, 3), dtype=np.uint8)
    _write_geotiff(str(images / "geo.tif"), rgb, transform=from_origin(541000.0, 4977000.0, 0.1, 0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rasterio's NotGeoreferencedWarning on writing
        _write_geotiff(str(images / "nocrs.tif"), rgb, crs=None)
    out = tmp_path / "out"
    base = ["--config-file", config, "--patch-size", "256", "--overlap", "64", "--output", str(out)]
    with pytest.warns(UserWarning, match="nocrs.tif: no CRS \\(not geo-referenced\\): outputs are in pixel coordinates"):
        assert predict(base + [str(images)]) == 0
    with open(out / "detections.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image_path", "xmin", "ymin", "xmax", "ymax", "label", "score"]
    assert {r["image_path"] for r in rows} == {"geo.tif", "nocrs.tif"}
    assert max(float(r["xmax"]) for r in rows if r["image_path"] == "nocrs.tif") <= 380
    with open(out / "coco_results.json") as f:
        assert len(json.load(f)) == len(rows)
    with open(out / "geo.geojson") as f:
        features = json.load(f)["features"]
    assert len(features) == sum(r["image_path"] == "geo.tif" for r in rows)
    assert all(541000 <= x <= 541038 and 4976974.4 <= y <= 4977000
               for feat in features for x, y in feat["geometry"]["coordinates"][0])
    assert not (out / "nocrs.geojson").exists()
    assert (out / "geo_drawing.png").stat().st_size > 0 and (out / "nocrs_drawing.png").exists()
    assert not list(out.glob("*.tmp"))

    # Results already there: refused unless --overwrite; nothing touched.
    before = (out / "detections.csv").read_bytes()
    with pytest.raises(SystemExit, match="already holds results .*pass --overwrite"):
        predict(base + [str(images)])
    assert (out / "detections.csv").read_bytes() == before
    assert predict(base + ["--overwrite", str(images / "geo.tif")]) == 0
    with open(out / "detections.csv") as f:
        assert {r["image_path"] for r in csv.DictReader(f)} == {"geo.tif"}

    # A corrupt image, a bad overlap, a patch below the coarsest stride: errors naming them.
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    with pytest.raises(SystemExit, match=f"{bad}: cannot be decoded as an image"):
        predict(base[:-2] + ["--output", str(tmp_path / "o2"), str(images / "geo.tif"), str(bad)])
    assert not (tmp_path / "o2").exists()
    with pytest.raises(SystemExit, match=r"--overlap 300 must be in \[0, --patch-size 256\)"):
        predict(["--config-file", config, "--patch-size", "256", "--overlap", "300",
                 "--output", str(tmp_path / "o3"), str(images / "geo.tif")])
    with pytest.raises(SystemExit, match="--patch-size 96 is below the model's coarsest stride 128"):
        predict(["--config-file", config, "--patch-size", "96", "--overlap", "0",
                 "--output", str(tmp_path / "o4"), str(images / "geo.tif")])


def test_corrupt_tiff_and_missing_file_are_named(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + os.urandom(300))
    with pytest.raises(ImageReadError, match="broken.tif: cannot be read by rasterio"):
        open_image(str(bad))
    with pytest.raises(ImageReadError, match="nothere.png: no such file"):
        open_image(str(tmp_path / "nothere.png"))
    with pytest.raises(ValueError, match="uint8 RGB"):
        ArrayReader(np.zeros((4, 4), dtype=np.uint8))


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    path = str(tmp_path / "detections.csv")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path) as f:
            f.write("image_path,xmin\n")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_predict_flags_parse_around_the_inputs():
    parser = _predict_tool().get_parser()
    args = parser.parse_args(["--config-file", "c.yaml", "--output", "o", "a.tif", "b.png", "--precision", "bf16",
                              "--channels-last", "--opts", "MODEL.DEVICE", "cpu"])
    assert args.inputs == ["a.tif", "b.png"] and args.precision == "bf16" and args.channels_last
    assert args.opts == ["MODEL.DEVICE", "cpu"]


def test_predict_help_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _predict_tool().main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--patch-size" in out and "--precision" in out


def test_yell_geotiff_tool_writes_the_documented_georeference(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("yell_geotiff", os.path.join(REPO_ROOT, "tools", "yell_geotiff.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = str(tmp_path / "yell_val.tif")
    assert tool.main(["--split", "val", "--output", out]) == 0
    with rasterio.open(out) as src:
        assert (src.width, src.height, src.count) == (1249, 1035, 3) and src.crs.to_epsg() == 32612
        assert (src.transform.c, src.transform.f, src.transform.a, src.transform.e) == (541000.0, 4978000.0, 0.1, -0.1)


def test_yell_geotiff_resamples_to_another_ground_resolution(tmp_path):
    """``--resample-to 0.05``: the scene at 2x the pixels, geo-referenced at 0.05 m (same corner);
    a .png output has the pixels only; a GSD of 0 is refused naming the flag."""
    import importlib.util

    import cv2

    spec = importlib.util.spec_from_file_location("yell_geotiff", os.path.join(REPO_ROOT, "tools", "yell_geotiff.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = str(tmp_path / "yell_val_005.tif")
    assert tool.main(["--split", "val", "--resample-to", "0.05", "--output", out]) == 0
    with rasterio.open(out) as src:
        assert (src.width, src.height) == (2498, 2070) and src.crs.to_epsg() == 32612
        assert (src.transform.c, src.transform.f, src.transform.a, src.transform.e) == (541000.0, 4978000.0, 0.05, -0.05)
    png = str(tmp_path / "yell_val_02.png")
    assert tool.main(["--split", "val", "--resample-to", "0.2", "--output", png]) == 0
    assert cv2.imread(png).shape == (518, 624, 3)
    with pytest.raises(SystemExit):
        tool.main(["--split", "val", "--resample-to", "0", "--output", out])


def test_whole_image_ap_counts_more_than_100_detections():
    from gfocal.evaluation.whole_image import coco_ap

    # 150 objects found exactly: AP 100 only if the cap is above COCO's default of 100.
    gt = np.array([[20.0 * i, 0, 20.0 * i + 10, 10] for i in range(150)])
    perfect = coco_ap([{"gt_boxes": gt, "boxes": gt, "scores": np.linspace(1, 0.5, 150)}], max_dets=1000)
    assert perfect["AP"] == pytest.approx(100.0) and perfect["AP50"] == pytest.approx(100.0)
    half = coco_ap([{"gt_boxes": gt, "boxes": gt[:75], "scores": np.linspace(1, 0.5, 75)}], max_dets=1000)
    assert half["AP"] == pytest.approx(50.0, abs=1.0)
    capped = coco_ap([{"gt_boxes": gt, "boxes": gt, "scores": np.linspace(1, 0.5, 150)}], max_dets=100)
    assert capped["AP"] < 70.0
