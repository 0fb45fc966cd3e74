"""Whole-image prediction shared among processes: tiles dealt out in turn, shares put back in tile
order, and tools/predict.py in 2 CPU processes (gloo) writing what one process writes."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, tiny_cfg

from gfocal.inference.distributed import tile_share
from gfocal.inference.tile_detections import TileDetections

rasterio = pytest.importorskip("rasterio")  # pinned in requirements.txt: present in CI
from rasterio.transform import from_origin  # noqa: E402


def test_tiles_are_dealt_out_in_turn_across_images():
    world, sizes = 3, [7, 1, 1, 5]
    offset, shares = 0, []
    for n in sizes:
        shares.append([tile_share(n, offset, r, world).tolist() for r in range(world)])
        offset += n
    for n, share in zip(sizes, shares):
        assert sorted(sum(share, [])) == list(range(n))  # every tile once
    assert shares[1] == [[], [0], []] and shares[2] == [[], [], [0]]  # small images: one rank each
    assert shares[0] == [[0, 3, 6], [1, 4], [2, 5]]  # a large one: its tiles shared
    assert sum(len(s[r]) for s in shares for r in range(world)) == sum(sizes)


def test_shares_are_put_back_in_tile_order():
    def part(tile_ids, boxes_per_tile):
        boxes = [torch.full((k, 4), float(t)) for t, k in zip(tile_ids, boxes_per_tile)]
        return TileDetections.from_tiles(boxes, [b[:, 0] + 0.5 for b in boxes],
                                         [torch.zeros(len(b), dtype=torch.long) for b in boxes],
                                         [b.clone() for b in boxes], tile_ids, num_run=len(tile_ids),
                                         num_skipped=1)
    whole = TileDetections.cat([part([1, 3], [2, 1]), part([0, 2], [1, 3]), TileDetections.empty()])
    assert whole.tile_ids.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert whole.boxes[:, 0].tolist() == [0, 1, 1, 2, 2, 2, 3] and whole.num_run == 4
    assert whole.num_skipped == 2 and torch.equal(whole.scores, whole.boxes[:, 0] + 0.5)


def _inputs(folder):
    """A 600x700 GeoTIFF whose left part (x < 320) is nodata (12 tiles of 256, 3 without data),
    a 300x256 GeoTIFF and a 256x300 PNG: 16 tiles."""
    import cv2

    rng = np.random.default_rng(5)
    folder.mkdir()
    big = rng.integers(1, 255, (3, 600, 700), dtype=np.uint8)
    big[:, :, :320] = 0
    with rasterio.open(folder / "a_border.tif", "w", driver="GTiff", width=700, height=600, count=3,
                       dtype="uint8", nodata=0, crs="EPSG:32612",
                       transform=from_origin(541000, 4977000, 0.1, 0.1)) as dst:
        dst.write(big)
    with rasterio.open(folder / "b_small.tif", "w", driver="GTiff", width=256, height=300, count=3,
                       dtype="uint8", crs="EPSG:32612", transform=from_origin(541100, 4977000, 0.1, 0.1)) as dst:
        dst.write(rng.integers(0, 255, (3, 300, 256), dtype=np.uint8))
    cv2.imwrite(str(folder / "c_photo.png"), rng.integers(0, 255, (256, 300, 3), dtype=np.uint8))


def _predict_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("predict_tool_dist", os.path.join(REPO_ROOT, "tools", "predict.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_two_cpu_processes_write_what_one_process_writes(tmp_path):
    cfg = tiny_cfg(**{"MODEL.GFL.SCORE_THRESH_TEST": 0.0, "TEST.DETECTIONS_PER_IMAGE": 30,
                      "DATASETS.TEST": ()})
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump())
    torch.manual_seed(0)
    from detectron2.modeling import build_model

    weights = tmp_path / "tiny.pth"  # random weights, saved: every process loads the same
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    images = tmp_path / "images"
    _inputs(images)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def argv(out):
        return ["--config-file", str(config), "--weights", str(weights), "--device", "cpu",
                "--patch-size", "256", "--overlap", "64", "--batch-size", "1", "--output", str(out),
                str(images)]

    # One process, here, on one thread as each worker below (same arithmetic, tile by tile).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the per-tile cap of the random model
            assert _predict_tool().main(argv(tmp_path / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "predict.py"), *argv(tmp_path / "two"),
           "--num-gpus", "2"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = proc.stdout
    assert "a_border.tif" in two and "3 without data skipped" in two
    ran = {line.split(":")[0]: int(line.split("ran ")[1].split()[0])
           for line in two.splitlines() if line.startswith("rank ")}
    assert sorted(ran) == ["rank 0 of 2", "rank 1 of 2"] and sum(ran.values()) == 13
    assert min(ran.values()) >= 6  # tiles of the large image and whole small images shared
    for name in ("detections.csv", "coco_results.json", "coco_images.json", "a_border.geojson",
                 "b_small.geojson"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    with open(tmp_path / "two" / "coco_results.json") as f:
        results = json.load(f)
    assert len({r["image_id"] for r in results}) == 3
    # No box centred on the nodata part of the large image.
    with open(tmp_path / "two" / "coco_images.json") as f:
        border_id = [im["id"] for im in json.load(f)["images"] if im["file_name"].endswith("a_border.tif")][0]
    centres = [r["bbox"][0] + r["bbox"][2] / 2 for r in results if r["image_id"] == border_id]
    assert centres and min(centres) >= 320
    assert (tmp_path / "two" / "a_border_drawing.png").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not list((tmp_path / "two").glob("*.tmp"))
