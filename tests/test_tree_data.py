"""The tree-crown datasets built from the real deepforest files."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from gfocal.data.tree_crowns import (
    TREE_SPLITS,
    TileSpec,
    build_tree_crowns,
    deepforest_data_dir,
    read_voc_boxes,
)
from gfocal.tiling import tile_boxes, tile_grid

# Boxes in deepforest 2.1.0's VOC files.
SOURCE_BOXES = {"train": 574, "val": 279}
# What the default TileSpec (400 px, overlap 200 / 0, min_visible 0.5) produces from them.
EXPECTED = {"train": (132, 2585, 365), "val": (12, 474, 60)}  # tiles, boxes, of them iscrowd


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("neon_trees"))
    return build_tree_crowns(root, TileSpec())


def _load(root, split):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(os.path.join(root, f"instances_{split}.json"))


def test_source_box_counts():
    import cv2

    for split, name in TREE_SPLITS.items():
        path = os.path.join(deepforest_data_dir(), name)
        h, w = cv2.imread(path).shape[:2]
        boxes = read_voc_boxes(path[:-4] + ".xml", (h, w))
        assert len(boxes) == SOURCE_BOXES[split]


@pytest.mark.parametrize("split", ["train", "val"])
def test_counts_and_boxes_inside_tiles(built, split):
    coco = _load(built, split)
    tiles, boxes, crowd = EXPECTED[split]
    assert len(coco.imgs) == tiles
    anns = list(coco.anns.values())
    assert len(anns) == boxes
    assert sum(a["iscrowd"] for a in anns) == crowd
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "Tree", "supercategory": "Tree"}]
    for a in anns:
        img = coco.imgs[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and a["area"] == pytest.approx(w * h)
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
    for img in coco.imgs.values():
        path = os.path.join(built, split, img["file_name"])
        assert os.path.isfile(path)


def test_every_source_box_is_kept_somewhere(built):
    """Each source crown is a normal annotation in at least one training tile (overlap 200 px
    exceeds the largest crown)."""
    coco = _load(built, "train")
    kept = set()
    for a in coco.anns.values():
        if a["iscrowd"]:
            continue
        x0, y0 = (int(v) for v in coco.imgs[a["image_id"]]["file_name"][:-4].split("_")[-2:])
        x, y, w, h = a["bbox"]
        kept.add((round(x + x0), round(y + y0), round(x + x0 + w), round(y + y0 + h)))
    import cv2

    path = os.path.join(deepforest_data_dir(), TREE_SPLITS["train"])
    source = read_voc_boxes(path[:-4] + ".xml", cv2.imread(path).shape[:2])
    assert {tuple(int(v) for v in b) for b in source} <= kept


def test_idempotent_and_repairs_damage(built):
    json_path = os.path.join(built, "instances_val.json")
    mtime = os.path.getmtime(json_path)
    build_tree_crowns(built, TileSpec())
    assert os.path.getmtime(json_path) == mtime  # intact: nothing rewritten

    tile = sorted(os.listdir(os.path.join(built, "val")))[0]
    with open(os.path.join(built, "val", tile), "r+b") as f:  # damage a tile
        f.truncate(100)
    with open(json_path, "w") as f:  # and a partial JSON
        f.write('{"images": [')
    build_tree_crowns(built, TileSpec())
    with open(json_path) as f:
        assert len(json.load(f)["images"]) == EXPECTED["val"][0]
    assert os.path.getsize(os.path.join(built, "val", tile)) > 1000


def test_missing_manifest_means_rebuild(tmp_path):
    root = str(tmp_path / "trees")
    os.makedirs(os.path.join(root, "val"))
    with open(os.path.join(root, "instances_val.json"), "w") as f:
        f.write("{}")  # a partial earlier build without manifest
    build_tree_crowns(root, TileSpec(tile_size=600, train_overlap=0))
    assert os.path.isfile(os.path.join(root, "instances_val.json.manifest"))
    assert len(_load(root, "val").imgs) == 6  # 1249 x 1035 in 600 px tiles: 3 x 2


def test_tile_grid_and_border_rule():
    grid = tile_grid((1035, 1249), 400, 0)
    assert grid.shape == (12, 4)
    assert grid[:, 2].max() == 1249 and grid[:, 3].max() == 1035 and grid.min() == 0
    assert np.all(grid[:, 2] - grid[:, 0] == 400)
    boxes = np.array([[390.0, 10, 420, 40], [370.0, 10, 410, 40], [399.0, 10, 450, 40]])
    clipped, crowd = tile_boxes(boxes, np.array([0.0, 0, 400, 400]), 0.5, 2.0)
    # 1/3 visible -> crowd; 3/4 visible -> normal; a 1 px sliver -> dropped
    assert clipped.tolist() == [[390, 10, 400, 40], [370, 10, 400, 40]]
    assert crowd.tolist() == [True, False]


def test_bad_spec_and_missing_source(tmp_path):
    with pytest.raises(ValueError, match="train_overlap"):
        build_tree_crowns(str(tmp_path / "a"), TileSpec(train_overlap=400))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_tree_crowns(str(tmp_path / "b"), TileSpec(), source_dir=str(tmp_path))


def test_bad_voc_label(tmp_path):
    xml = tmp_path / "x.xml"
    xml.write_text(
        "<annotation><object><name>Car</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(ValueError, match="object 0 has label 'Car'"):
        read_voc_boxes(str(xml), (10, 10))


def test_registered_lazily():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import gfocal  # noqa: F401

    assert {"neon_trees_train", "neon_trees_val"} <= set(DatasetCatalog.list())
    meta = MetadataCatalog.get("neon_trees_val")
    assert meta.thing_classes == ["Tree"] and meta.evaluator_type == "coco"


def test_concurrent_builds_wait_for_each_other(tmp_path, monkeypatch):
    """Two workers that find the data missing at once (e.g. train_net.py --num-gpus 2): one
    builds while the other waits for the lock, then finds the build intact and returns."""
    import threading
    import time

    from gfocal.data import tiles

    root = str(tmp_path / "trees")
    spec = TileSpec(tile_size=600, train_overlap=0)
    original, builders, errors = tiles._write, [], []

    def slow_build(*args):
        builders.append(threading.get_ident())
        time.sleep(0.5)  # both workers would be inside here at once without the lock
        return original(*args)

    monkeypatch.setattr(tiles, "_write", slow_build)

    def build():
        try:
            build_tree_crowns(root, spec)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(builders) == 2  # one per split: the second worker found the first one's builds intact
    assert len(_load(root, "val").imgs) == 6


def test_tile_grid_subset_keeps_every_other_column_and_row():
    """The main job's threshold tiles: every 2nd column and row of the training grid and the last
    ones, 42 of the 132 tiles, still covering the whole training image, with their records."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from gfocal.data.tree_crowns import register_tile_grid_subset

    assert register_tile_grid_subset("train", 1) == "neon_trees_train"
    name = register_tile_grid_subset("train", 2)
    assert name == "neon_trees_train_every2" and register_tile_grid_subset("train", 2) == name
    full = {r["image_id"]: r for r in DatasetCatalog.get("neon_trees_train")}
    subset = DatasetCatalog.get(name)
    assert len(full) == 132 and len(subset) == 6 * 7 == 42
    assert all(r == full[r["image_id"]] for r in subset)
    with open(MetadataCatalog.get("neon_trees_train").json_file) as f:
        images = json.load(f)["images"]
    windows = {im["id"]: im["window"] for im in images}
    width = max(w[2] for w in windows.values())
    height = max(w[3] for w in windows.values())
    kept = [windows[r["image_id"]] for r in subset]
    for axis, size in ((0, width), (1, height)):
        starts = sorted({w[axis] for w in kept})
        assert starts[0] == 0 and starts[-1] + 400 == size  # first and last tile of the grid
        assert (np.diff(starts) <= 400).all()  # no hole
        assert len(starts) == (6, 7)[axis]  # of 11 columns and 12 rows
    with pytest.raises(ValueError, match="step 0 must be >= 1"):
        register_tile_grid_subset("train", 0)
