"""Training on large annotated images (issue 23): ``DATASETS.TILING`` grid mode through
``train_net.py``, the random-crop mapper and its box rule at the cuts, empty-tile keeping, the
whole-image evaluator of ``TEST.WHOLE_IMAGE`` (AP and P/R/F1 at IoU 0.4 on stitched tiles), the
start-up warning of large images trained without tiling, and the bad-input errors."""
import argparse
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog
from detectron2.structures import BoxMode, Boxes, Instances

from conftest import REPO_ROOT
from gfocal.config import load_config
from gfocal.data.register import add_dataset_arguments, register_datasets_from_args
from gfocal.data.tile_crop import TileCropMapper, build_train_mapper, crop_annotations
from gfocal.data.tiles import TilingSpec, grid_tiles
from gfocal.data.tiling_config import apply_dataset_tiling, tiling_spec

TREES = os.path.join(REPO_ROOT, "configs", "trees", "gfl_lite0_trees.yaml")
_counter = [0]


def unique(prefix: str = "large") -> str:
    _counter[0] += 1
    return f"{prefix}_{os.getpid()}_{_counter[0]}"


def orthomosaic(folder, size=(384, 512), boxes=None, name="mosaic.png") -> str:
    """A synthetic large annotated image (bright squares on noise) and its deepforest CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    height, width = size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    if boxes is None:  # a 24 px crown every 64 px, away from the 128 px grid's cuts
        boxes = [(x, y, x + 24, y + 24) for y in range(20, height - 24, 64)
                 for x in range(20, width - 24, 64)]
    for x0, y0, x1, y1 in boxes:
        image[y0:y1, x0:x1] = (40, 200, 60)
    cv2.imwrite(str(folder / name), image)
    rows = ["image_path,xmin,ymin,xmax,ymax,label"]
    rows += [f"{name},{x0},{y0},{x1},{y1},Tree" for x0, y0, x1, y1 in boxes]
    csv = folder / "annotations.csv"
    csv.write_text("\n".join(rows) + "\n")
    return str(csv)


def register(spec: str) -> str:
    parser = add_dataset_arguments(argparse.ArgumentParser())
    return register_datasets_from_args(parser.parse_args([f"--dataset={spec}"]))[0]


def tiled_cfg(tmp_path, train=(), test=(), **keys):
    opts = ["DATASETS.TRAIN", str(tuple(train)), "DATASETS.TEST", str(tuple(test)),
            "DATASETS.TILING.SIZE", "128", "DATASETS.TILING.OVERLAP", "32",
            "DATASETS.TILING.CACHE_DIR", str(tmp_path / "tiles"),
            "MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB", "0", "MODEL.DEVICE", "cpu",
            "OUTPUT_DIR", str(tmp_path / "out")]
    for key, value in keys.items():
        opts += [key.replace("__", "."), str(value)]
    return load_config(TREES, opts)


def run_two_iterations(cmd, out) -> None:
    """Run ``cmd`` (a train_net.py command) for 2 iterations of batch 2 at 128 px on the CPU,
    writing to ``out``; fail with its output's end if it exits non-zero."""
    cmd = cmd + [
        "MODEL.DEVICE", "cpu", "MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB", "0",
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "INPUT.MAX_SIZE_TRAIN", "128", "OUTPUT_DIR", str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# Grid mode end to end
# ------------------------------------------------------------------------------------------------
@pytest.mark.trains_in_subprocess
def test_grid_tiles_train_and_evaluate_on_whole_images(tmp_path):
    """``train_net.py --dataset big=csv:...`` with ``DATASETS.TILING.MODE grid``: the 384x512 image
    trains as 128 px tiles (written once under CACHE_DIR), and ``TEST.WHOLE_IMAGE.ENABLED``
    scores the stitched tiles of the test copy against the whole-image boxes."""
    csv = orthomosaic(tmp_path / "big")
    out, tiles = tmp_path / "out", tmp_path / "tiles"
    cmd = [
        sys.executable, "-W", "ignore", os.path.join(REPO_ROOT, "train_net.py"),
        "--config-file", TREES,
        "--dataset", f"big_train=csv:{csv}", "--dataset", f"big_val=csv:{csv}",
        "DATASETS.TRAIN", "('big_train',)", "DATASETS.TEST", "('big_val',)",
        "DATASETS.TILING.MODE", "grid", "DATASETS.TILING.SIZE", "128",
        "DATASETS.TILING.OVERLAP", "32", "DATASETS.TILING.CACHE_DIR", str(tiles),
        "TEST.WHOLE_IMAGE.ENABLED", "True", "TEST.AUG.ENABLED", "False",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
        "MODEL.GFL.SCORE_THRESH_TEST", "0.0",
    ]
    run_two_iterations(cmd, out)
    train_json, val_json = (sorted(tiles.glob(f"{n}_128_*/instances.json")) for n in
                            ("big_train", "big_val"))
    assert len(train_json) == 1 and len(val_json) == 1
    train = json.loads(train_json[0].read_text())
    assert len(train["images"]) == 4 * 5  # 384x512 at 128 px with 32 px overlap: 4 rows, 5 columns
    assert train["info"]["tiling"]["overlap"] == 32
    assert json.loads(val_json[0].read_text())["info"]["tiling"]["overlap"] == 0  # TEST_OVERLAP
    log = (out / "log.txt").read_text()
    assert "Starting training from iteration 0" in log
    whole = json.loads((out / "inference" / "big_val" / "whole_image.json").read_text())
    assert whole["iou"] == 0.4 and whole["images"] == 1
    for key in ("AP", "AP50", "precision", "recall", "f1", "best_f1"):
        assert key in whole and np.isfinite(whole[key])
    assert "whole_image" in log  # the results table of the task


@pytest.mark.trains_in_subprocess
def test_train_net_trains_on_random_crops(tmp_path):
    """``train_net.py`` with ``DATASETS.TILING.MODE crop`` (the YAML twin of the LazyConfig test
    below): two iterations on 128 px random crops of the large image, no grid written."""
    csv = orthomosaic(tmp_path / "big")
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-W", "ignore", os.path.join(REPO_ROOT, "train_net.py"),
        "--config-file", TREES, "--dataset", f"crop_big=csv:{csv}",
        "DATASETS.TRAIN", "('crop_big',)", "DATASETS.TEST", "()",
        "DATASETS.TILING.MODE", "crop", "DATASETS.TILING.SIZE", "128",
        "DATASETS.TILING.OVERLAP", "32", "DATASETS.TILING.CACHE_DIR", str(tmp_path / "tiles"),
    ]
    run_two_iterations(cmd, out)
    assert (out / "model_final.pth").is_file()
    log = (out / "log.txt").read_text()
    assert "Starting training from iteration 0" in log
    assert not (tmp_path / "tiles").exists()  # crops of the whole image, no grid written


# ------------------------------------------------------------------------------------------------
# Random crops and the box rule at the cuts
# ------------------------------------------------------------------------------------------------
def test_box_rule_at_the_cuts():
    """Clipped to the window; iscrowd below MIN_VISIBLE of its area; dropped when thinner than
    MIN_SIDE; boxes already crowd stay crowd."""
    record = {"height": 300, "width": 300, "annotations": [
        {"bbox": [10, 10, 30, 30], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # inside
        {"bbox": [90, 10, 130, 30], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # 1/4 in
        {"bbox": [70, 40, 110, 60], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # 3/4 in
        {"bbox": [99, 70, 140, 90], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # 1 px in
        {"bbox": [40, 40, 50, 50], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 1},
        {"bbox": [200, 200, 220, 220], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # out
    ]}
    spec = TilingSpec(tile_size=100, min_visible=0.5, min_side=2.0)
    anns = crop_annotations(record, (0, 0, 100, 100), spec)
    got = [(a["bbox"], a["iscrowd"]) for a in anns]
    assert got == [([10, 10, 30, 30], 0), ([90, 10, 100, 30], 1), ([70, 40, 100, 60], 0),
                   ([40, 40, 50, 50], 1)]
    # Boxes are relative to the window.
    shifted = crop_annotations(record, (60, 0, 160, 100), spec)
    assert ([10, 40, 50, 60], 0) in [(a["bbox"], a["iscrowd"]) for a in shifted]
    # The grid tiles follow the same rule.
    tiles = grid_tiles([dict(record, file_name="x.png")], TilingSpec(100, 0, 0.5, 2.0))
    first = tiles[0]
    assert first.boxes.tolist() == [b for b, _ in got] and first.crowd.tolist() == [0, 1, 0, 1]


def test_crop_mode_lists_each_image_per_window_and_cuts_random_crops(tmp_path):
    csv = orthomosaic(tmp_path / "big")
    name = register(f"{unique()}=csv:{csv}")
    cfg = tiled_cfg(tmp_path, train=[name], DATASETS__TILING__MODE="crop")
    assert apply_dataset_tiling(cfg) == [name]
    assert apply_dataset_tiling(cfg) == []  # idempotent for the same config
    records = DatasetCatalog.get(name)
    assert len(records) == 20 and all(r["tile_crop"] and r["width"] == 512 for r in records)
    mapper = build_train_mapper(cfg, [])
    assert isinstance(mapper, TileCropMapper)
    source = np.ascontiguousarray(cv2.imread(records[0]["file_name"])[:, :, ::-1])  # RGB
    np.random.seed(0)
    windows = set()
    for _ in range(6):
        out = mapper(records[0])
        x0, y0, x1, y1 = out["tile_window"]
        windows.add((x0, y0))
        assert out["image"].shape == (3, 128, 128) and (x1 - x0, y1 - y0) == (128, 128)
        assert torch.equal(out["image"].permute(1, 2, 0), torch.from_numpy(source[y0:y1, x0:x1]))
        boxes = out["instances"].gt_boxes.tensor
        assert len(boxes) and boxes.min() >= 0 and boxes.max() <= 128
        # Training sees the normal boxes only: each kept box has >= MIN_VISIBLE of its area.
        expected = [a for a in crop_annotations(records[0], (x0, y0, x1, y1), mapper.spec)
                    if not a["iscrowd"]]
        assert len(boxes) == len(expected)
    assert len(windows) > 1  # random positions
    # The per-dataset grid of the test datasets stays deterministic.
    assert tiling_spec(cfg, train=False).overlap == 0


def test_crop_mode_redraws_empty_crops_as_empty_fraction_says(tmp_path, monkeypatch):
    """One crown in a 512 px image: with EMPTY_FRACTION 0, a crop without a normal box is drawn
    again (up to MAX_DRAWS times); with 1, every first draw is kept."""
    import gfocal.data.tile_crop as tile_crop

    csv = orthomosaic(tmp_path / "big", size=(512, 512), boxes=[(200, 200, 240, 240)])
    name = register(f"{unique()}=csv:{csv}")
    draws = []

    def counted(*args, **kwargs):
        draws[-1] += 1
        return random_window(*args, **kwargs)

    random_window = tile_crop.random_window
    monkeypatch.setattr(tile_crop, "random_window", counted)
    hits = {}
    for fraction in (0.0, 1.0):
        cfg = tiled_cfg(tmp_path, train=[name], DATASETS__TILING__MODE="crop",
                        DATASETS__TILING__SIZE=128, DATASETS__TILING__EMPTY_FRACTION=fraction)
        apply_dataset_tiling(cfg)
        mapper = TileCropMapper(cfg, is_train=True, augmentations=[])
        np.random.seed(1)
        found = []
        for _ in range(30):
            draws.append(0)
            found.append(len(mapper(DatasetCatalog.get(name)[0])["instances"]) > 0)
        counts, draws[:] = list(draws), []
        if fraction == 0.0:  # redrawn until a box is in, or MAX_DRAWS
            assert all(f or c == tile_crop.MAX_DRAWS for f, c in zip(found, counts))
            assert all(c == 1 for f, c in zip(found, counts) if f) is False  # some were redrawn
        else:
            assert counts == [1] * 30
        hits[fraction] = sum(found)
    assert hits[0.0] > 2 * hits[1.0]


def test_empty_tiles_kept_as_empty_fraction_says():
    record = {"file_name": "x.png", "height": 400, "width": 400, "annotations": [
        {"bbox": [10, 10, 40, 40], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}]}
    counts = {}
    for fraction in (0.0, 0.5, 1.0):
        tiles = grid_tiles([record], TilingSpec(100, 0, empty_fraction=fraction, seed=3))
        assert sum(not t.empty for t in tiles) == 1  # the tile with the box is always kept
        counts[fraction] = sum(t.empty for t in tiles)
    assert counts == {0.0: 0, 0.5: 8, 1.0: 15}  # round(0.5 * 15) = 8 of the 15 empty tiles
    same = grid_tiles([record], TilingSpec(100, 0, empty_fraction=0.5, seed=3))
    assert [t.window for t in same] == [t.window for t in grid_tiles(
        [record], TilingSpec(100, 0, empty_fraction=0.5, seed=3))]  # seeded


# ------------------------------------------------------------------------------------------------
# Whole-image evaluation
# ------------------------------------------------------------------------------------------------
def test_whole_image_evaluator_selected_for_a_tiled_test_dataset(tmp_path):
    from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

    from gfocal.engine import Trainer
    from gfocal.evaluation.whole_image import TiledWholeImageEvaluator

    csv = orthomosaic(tmp_path / "big")
    name = register(f"{unique()}=csv:{csv}")
    cfg = tiled_cfg(tmp_path, test=[name], DATASETS__TILING__MODE="grid",
                    TEST__WHOLE_IMAGE__ENABLED=True)
    apply_dataset_tiling(cfg)
    evaluator = Trainer.build_evaluator(cfg, name, str(tmp_path / "eval"))
    assert isinstance(evaluator, DatasetEvaluators)
    kinds = [type(e) for e in evaluator._evaluators]
    assert COCOEvaluator in kinds and TiledWholeImageEvaluator in kinds
    whole = evaluator._evaluators[kinds.index(TiledWholeImageEvaluator)]
    # Perfect detections on every tile: stitched, they are the whole image's boxes.
    whole.reset()
    for tile in DatasetCatalog.get(name):
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                 for a in tile["annotations"] if not a.get("iscrowd")]
        inst = Instances((tile["height"], tile["width"]))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.full((len(boxes),), 0.9)
        inst.pred_classes = torch.zeros(len(boxes), dtype=torch.long)
        whole.process([{"image_id": tile["image_id"]}], [{"instances": inst}])
    res = whole.evaluate()["whole_image"]
    assert res["AP"] == pytest.approx(100.0) and res["images"] == 1
    assert res["precision"] == res["recall"] == res["f1"] == 100.0  # in %
    saved = json.loads((tmp_path / "eval" / "whole_image.json").read_text())
    assert saved["iou"] == 0.4 and saved["at_threshold"]["num_gt"] == 48
    # Off by default: the per-tile COCO evaluation alone.
    cfg.defrost()
    cfg.TEST.WHOLE_IMAGE.ENABLED = False
    cfg.TEST.PRECISION_RECALL.ENABLED = False
    assert isinstance(Trainer.build_evaluator(cfg, name, str(tmp_path / "eval")), COCOEvaluator)


def test_whole_image_evaluator_refuses_an_untiled_dataset(tmp_path):
    from gfocal.evaluation.whole_image import build_whole_image_evaluator

    name = register(f"{unique()}=csv:{orthomosaic(tmp_path / 'big')}")
    cfg = tiled_cfg(tmp_path, test=[name], TEST__WHOLE_IMAGE__ENABLED=True)
    DatasetCatalog.get(name)
    with pytest.raises(ValueError, match="tile it with DATASETS.TILING.MODE grid"):
        build_whole_image_evaluator(cfg, name)


# ------------------------------------------------------------------------------------------------
# The start-up warning and bad input
# ------------------------------------------------------------------------------------------------
def test_large_images_without_tiling_warn_at_start_naming_the_option(tmp_path):
    """A 2000 px image with 20 px crowns, resized to 400 px for training: 4 px boxes."""
    boxes = [(x, y, x + 20, y + 20) for y in range(100, 1900, 200) for x in range(100, 1900, 200)]
    name = register(f"{unique()}=csv:{orthomosaic(tmp_path / 'big', (2000, 2000), boxes)}")
    cfg = tiled_cfg(tmp_path, train=[name])
    with pytest.warns(UserWarning, match="DATASETS.TILING.MODE") as caught:
        assert apply_dataset_tiling(cfg) == []
    message = next(str(w.message) for w in caught if "DATASETS.TILING.MODE" in str(w.message))
    assert "INPUT.MIN_SIZE_TRAIN" in message and name in message and "no positive anchor" in message
    # Tiled, the same dataset does not warn (its boxes keep their size).
    import warnings

    tiled = tiled_cfg(tmp_path, train=[name], DATASETS__TILING__MODE="grid",
                      DATASETS__TILING__SIZE=400, DATASETS__TILING__OVERLAP=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert apply_dataset_tiling(tiled) == [name]
    assert not [w for w in caught if "DATASETS.TILING" in str(w.message)]


def test_small_boxes_warning_reaches_train_net_before_training(tmp_path):
    """The warning comes from ``train_net.py``'s setup (gfocal.engine.defaults.setup)."""
    from gfocal.engine.defaults import setup

    boxes = [(x, y, x + 20, y + 20) for y in range(100, 1900, 200) for x in range(100, 1900, 200)]
    csv = orthomosaic(tmp_path / "big", (2000, 2000), boxes)
    name = unique()
    register(f"{name}=csv:{csv}")
    args = argparse.Namespace(config_file=TREES, opts=[
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "o"),
        "MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB", "0"], eval_only=False, resume=False,
        num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto", config_file_name=None)
    with pytest.warns(UserWarning, match="DATASETS.TILING.MODE"):
        setup(args)


@pytest.mark.parametrize("keys, match", [
    ({"DATASETS__TILING__SIZE": 16}, r"DATASETS.TILING.SIZE=16 is below the model's coarsest "
                                      r"stride 32"),
    ({"DATASETS__TILING__OVERLAP": 128}, r"DATASETS.TILING.OVERLAP=128 must be in \[0, "
                                          r"DATASETS.TILING.SIZE=128\)"),
    ({"DATASETS__TILING__OVERLAP": 300}, r"DATASETS.TILING.OVERLAP=300"),
    ({"DATASETS__TILING__MODE": "tiles"}, r"DATASETS.TILING.MODE='tiles' is not one of"),
])
def test_bad_tiling_keys_are_errors_naming_the_key(tmp_path, keys, match):
    name = register(f"{unique()}=csv:{orthomosaic(tmp_path / 'big')}")
    keys.setdefault("DATASETS__TILING__MODE", "grid")
    cfg = tiled_cfg(tmp_path, train=[name], **keys)
    with pytest.raises(ValueError, match=match):
        apply_dataset_tiling(cfg)
    assert not (tmp_path / "tiles").exists()


def test_bad_test_overlap_names_its_key(tmp_path):
    name = register(f"{unique()}=csv:{orthomosaic(tmp_path / 'big')}")
    cfg = tiled_cfg(tmp_path, test=[name], DATASETS__TILING__MODE="grid",
                    DATASETS__TILING__TEST_OVERLAP=128)
    with pytest.raises(ValueError, match=r"DATASETS.TILING.TEST_OVERLAP=128 must be in"):
        apply_dataset_tiling(cfg)


def test_coarsest_stride_follows_the_feature_levels(tmp_path):
    """The R-50 config's P3-P7: a 64 px tile is below its coarsest stride 128."""
    cfg = load_config(os.path.join(REPO_ROOT, "configs", "gfl_R_50_FPN_1x.yaml"),
                      ["DATASETS.TILING.SIZE", "64", "DATASETS.TILING.OVERLAP", "0"])
    with pytest.raises(ValueError, match="DATASETS.TILING.SIZE=64 is below the model's coarsest "
                                         "stride 128"):
        tiling_spec(cfg, train=True)


@pytest.mark.parametrize("gsd", ["0", "-0.1"])
def test_predict_refuses_a_gsd_of_zero_or_below(tmp_path, gsd):
    """``tools/predict.py --gsd 0``: an error naming the flag, before the model is built."""
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.zeros((64, 64, 3), np.uint8))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", os.path.join(REPO_ROOT, "tools", "predict.py"),
         "--config-file", TREES, "--output", str(tmp_path / "o"), "--gsd", gsd, str(image)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert f"--gsd {float(gsd)} must be > 0" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# LazyConfig: dataloader.tiling
# ------------------------------------------------------------------------------------------------
LAZY_TREES = os.path.join(REPO_ROOT, "configs", "trees", "gfl_lite0_trees.py")


def lazy_cfg(tmp_path, name, tiling=None, *opts):
    from gfocal.config import load_lazy_config

    cfg = load_lazy_config(LAZY_TREES, [
        f"dataloader.train.dataset.names={name}", f"dataloader.test.dataset.names={name}",
        "model.backbone.bottom_up.feature_cache_mb=0", *opts])
    if tiling is not None:
        cfg.dataloader.tiling = dict(tiling, cache_dir=str(tmp_path / "tiles"))
    return cfg


def test_lazy_config_grid_tiling(tmp_path):
    from gfocal.data.tiling_config import apply_lazy_dataset_tiling

    name = register(f"{unique()}=csv:{orthomosaic(tmp_path / 'big')}")
    cfg = lazy_cfg(tmp_path, name, dict(mode="grid", size=128, overlap=32))
    assert apply_lazy_dataset_tiling(cfg) == [name]  # train and test share the name: train grid
    tiles = DatasetCatalog.get(name)
    assert len(tiles) == 20 and all(r["width"] == r["height"] == 128 for r in tiles)
    assert "tile_crop" not in cfg.dataloader.train.mapper  # the grid keeps DatasetMapper


def test_lazy_config_crop_mode_uses_the_crop_mapper(tmp_path):
    from detectron2.config import instantiate

    from gfocal.data.tiling_config import apply_lazy_dataset_tiling

    name = register(f"{unique()}=csv:{orthomosaic(tmp_path / 'big')}")
    cfg = lazy_cfg(tmp_path, name, dict(mode="crop", size=128, overlap=32, min_visible=0.6))
    apply_lazy_dataset_tiling(cfg)
    mapper = instantiate(cfg.dataloader.train.mapper)
    assert isinstance(mapper, TileCropMapper)
    assert mapper.spec == TilingSpec(128, 32, 0.6, 2.0, 1.0, 0)
    out = mapper(DatasetCatalog.get(name)[0])
    x0, y0, x1, y1 = out["tile_window"]
    assert (x1 - x0, y1 - y0) == (128, 128) and len(out["instances"]) > 0
    assert out["image"].shape[1:] == (400, 400)  # then the config's training resize


def test_lazy_config_errors_and_warning_name_the_lazy_keys(tmp_path):
    from gfocal.data.tiling_config import apply_lazy_dataset_tiling

    name = register(f"{unique()}=csv:{orthomosaic(tmp_path / 'big')}")
    with pytest.raises(ValueError, match=r"dataloader.tiling.size=16 is below the model's "
                                         r"coarsest stride 32"):
        apply_lazy_dataset_tiling(lazy_cfg(tmp_path, name, dict(mode="grid", size=16)))
    with pytest.raises(ValueError, match=r"dataloader.tiling.overlap=128 must be in \[0, "
                                         r"dataloader.tiling.size=128\)"):
        apply_lazy_dataset_tiling(lazy_cfg(tmp_path, name, dict(mode="grid", size=128,
                                                                overlap=128)))
    with pytest.raises(ValueError, match="dataloader.tiling.tile_size: not a tiling key"):
        apply_lazy_dataset_tiling(lazy_cfg(tmp_path, name, dict(tile_size=128)))
    boxes = [(x, y, x + 20, y + 20) for y in range(100, 1900, 200) for x in range(100, 1900, 200)]
    big = register(f"{unique()}=csv:{orthomosaic(tmp_path / 'huge', (2000, 2000), boxes)}")
    with pytest.warns(UserWarning, match=r"dataloader.tiling.mode grid") as caught:
        apply_lazy_dataset_tiling(lazy_cfg(tmp_path, big))
    message = next(str(w.message) for w in caught if "dataloader.tiling" in str(w.message))
    assert "dataloader.train.mapper.augmentations[0].short_edge_length" in message
    assert "DATASETS.TILING" not in message


@pytest.mark.trains_in_subprocess
def test_lazyconfig_train_net_trains_on_random_crops(tmp_path):
    """``lazyconfig_train_net.py`` with ``dataloader.tiling.mode=crop`` (a dict key set from the
    command line): two iterations on 128 px random crops of the large image."""
    csv = orthomosaic(tmp_path / "big")
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-W", "ignore", os.path.join(REPO_ROOT, "lazyconfig_train_net.py"),
        "--config-file", LAZY_TREES, "--dataset", f"lazy_big=csv:{csv}",
        "dataloader.train.dataset.names=lazy_big", "dataloader.test.dataset.names=lazy_big",
        "+dataloader.tiling.mode=crop", "+dataloader.tiling.size=128", "+dataloader.tiling.overlap=32",
        f"+dataloader.tiling.cache_dir={tmp_path / 'tiles'}", "train.max_iter=2",
        "train.eval_period=0", "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
        "dataloader.train.mapper.augmentations.0.max_size=128",
        "dataloader.test.mapper.augmentations.0.short_edge_length=128",
        "dataloader.test.mapper.augmentations.0.max_size=128",
        "model.backbone.bottom_up.feature_cache_mb=0", "lr_multiplier.scheduler.milestones=[]",
        "lr_multiplier.scheduler.values=[1.0]", "lr_multiplier.scheduler.num_updates=2",
        f"train.output_dir={out}",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "model_final.pth").is_file()
    assert not (tmp_path / "tiles").exists()  # crops of the whole image, no grid written


def test_model_refuses_a_negative_or_infinite_input_gsd():
    """``INPUT.GSD`` below 0 stops the model build (training and prediction), naming the key."""
    from gfocal.config import check_gfl_config

    with pytest.raises(ValueError, match=r"INPUT.GSD=-0.1 must be > 0"):
        check_gfl_config(load_config(TREES, ["INPUT.GSD", "-0.1"]))
    cfg = load_config(TREES)
    cfg.INPUT.GSD = float("inf")
    with pytest.raises(ValueError, match=r"INPUT.GSD=inf must be > 0"):
        check_gfl_config(cfg)
    check_gfl_config(load_config(TREES, ["INPUT.GSD", "0.0"]))  # 0: unknown, allowed


def test_predict_names_how_to_reproject_a_geographic_geotiff(tmp_path):
    """``tools/predict.py`` on a GeoTIFF in EPSG:4326 (degrees) with a model of known INPUT.GSD:
    an error naming the file and how to reproject it (or --gsd), no outputs."""
    import rasterio
    from affine import Affine

    path = tmp_path / "degrees.tif"
    with rasterio.open(path, "w", driver="GTiff", height=64, width=64, count=3, dtype="uint8",
                       crs="EPSG:4326", transform=Affine(1e-6, 0, -110.5, 0, -1e-6, 44.9)) as dst:
        dst.write(np.full((3, 64, 64), 90, np.uint8))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", os.path.join(REPO_ROOT, "tools", "predict.py"),
         "--config-file", TREES, "--output", str(tmp_path / "o"), str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "degrees.tif" in proc.stderr and "geographic (degrees)" in proc.stderr, proc.stderr[-2000:]
    assert "gdalwarp -t_srs" in proc.stderr and "--gsd" in proc.stderr
    assert not (tmp_path / "o" / "detections.csv").exists()
