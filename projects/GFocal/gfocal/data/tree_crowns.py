"""NEON aerial tree crowns (shipped inside the ``deepforest`` wheel) as tiled COCO datasets.

Two real photographs with hand-drawn crown boxes (Pascal VOC XML) become two splits:

* ``neon_trees_train``: tiles of ``2019_YELL_2_528000_4978000_image_crop2.png`` (574 boxes)
* ``neon_trees_val``: tiles of ``2019_YELL_2_541000_4977000_image_crop.png`` (279 boxes)

Each split is the VOC file read by the ``voc`` format (:mod:`gfocal.data.formats`) and cut by the
general dataset tiling (:mod:`gfocal.data.tiles`: the one grid, its box rule at the cuts and its
checked, idempotent writer), with the parameters of :class:`TileSpec`: 400 px tiles, overlap 200 px
for training and 0 for validation, ``min_visible`` 0.5, ``min_side`` 2 px, every empty tile kept.
Any dataset of large images takes the same path with ``DATASETS.TILING`` (docs/own_data.md).
:func:`register_tree_crowns` registers the splits with lazy loaders that build the data on first
use.
"""
import json
import logging
import os
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from typing import Dict, List, Optional, Tuple

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog

from .tiles import TilingSpec, write_tiles

__all__ = [
    "TREE_SPLITS",
    "TileSpec",
    "build_tree_crowns",
    "deepforest_data_dir",
    "read_voc_boxes",
    "register_tile_grid_subset",
    "register_tree_crowns",
    "tree_crowns_root",
    "tree_source_records",
]

logger = logging.getLogger(__name__)

# split -> source image in deepforest/data (its VOC XML has the same stem)
TREE_SPLITS: Dict[str, str] = {
    "train": "2019_YELL_2_528000_4978000_image_crop2.png",
    "val": "2019_YELL_2_541000_4977000_image_crop.png",
}
CATEGORY_NAME = "Tree"


@dataclass(frozen=True)
class TileSpec:
    """The tiling of the two splits (see :class:`gfocal.data.tiles.TilingSpec`)."""

    tile_size: int = 400
    train_overlap: int = 200
    val_overlap: int = 0
    min_visible: float = 0.5
    min_side: float = 2.0

    def split(self, split: str) -> TilingSpec:
        overlap = self.train_overlap if split == "train" else self.val_overlap
        return TilingSpec(self.tile_size, overlap, self.min_visible, self.min_side)

    def validate(self) -> None:
        if self.tile_size < 32:
            raise ValueError(f"tile_size={self.tile_size} must be >= 32 pixels")
        for name in ("train_overlap", "val_overlap"):
            value = getattr(self, name)
            if not 0 <= value < self.tile_size:
                raise ValueError(f"{name}={value} must be in [0, tile_size={self.tile_size})")
        for split in TREE_SPLITS:
            self.split(split).validate(min_stride=32, where="TileSpec")


def tree_crowns_root() -> str:
    """``$DETECTRON2_DATASETS/neon_trees`` (detectron2's convention; default ``datasets/``)."""
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "neon_trees")


def deepforest_data_dir() -> str:
    """The ``deepforest/data`` folder, found without importing deepforest (heavy imports)."""
    spec = find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'deepforest' is not installed; it ships the tree-crown images: "
            "pip install --no-deps deepforest==2.1.0 (see requirements.txt)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def tree_source_records(split: str, source_dir: Optional[str] = None) -> List[dict]:
    """The whole-image record of a split, read by the ``voc`` format (one XML, class ``Tree``)."""
    from .formats import load_voc_folder

    source_dir = source_dir or deepforest_data_dir()
    stem = os.path.splitext(TREE_SPLITS[split])[0]
    for ext in (".png", ".xml"):
        path = os.path.join(source_dir, stem + ext)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tree-crown source file {path} not found")
    return load_voc_folder(os.path.join(source_dir, stem + ".xml"), source_dir, [CATEGORY_NAME])[0]


def read_voc_boxes(xml_path: str, image_hw: Tuple[int, int]) -> np.ndarray:
    """(N, 4) float XYXY boxes of one Pascal VOC file, all labelled ``Tree`` and inside the image."""
    from .formats import parse_voc_xml

    height, width = image_hw
    boxes = []
    for i, obj in enumerate(parse_voc_xml(xml_path)[2]):
        if obj.name != CATEGORY_NAME:
            raise ValueError(
                f"{xml_path}: object {i} has label {obj.name!r}, expected {CATEGORY_NAME!r}"
            )
        x0, y0, x1, y1 = obj.box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(
                f"{xml_path}: object {i} box {obj.box} is empty or outside the {width}x{height} image"
            )
        boxes.append(obj.box)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _built_spec(root: str) -> Optional[TileSpec]:
    """The spec of an earlier build under ``root`` (from its manifests), or None."""
    try:
        specs = {}
        for split in TREE_SPLITS:
            with open(os.path.join(root, f"instances_{split}.json.manifest")) as f:
                specs[split] = json.load(f)["spec"]
        train, val = specs["train"], specs["val"]
        return TileSpec(train["tile_size"], train["overlap"], val["overlap"],
                        train["min_visible"], train["min_side"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_tree_crowns(
    root: Optional[str] = None,
    spec: Optional[TileSpec] = None,
    source_dir: Optional[str] = None,
    force: bool = False,
) -> str:
    """Build (or check) the tiled COCO datasets under ``root`` (default :func:`tree_crowns_root`):
    ``<root>/instances_<split>.json`` and the tiles in ``<root>/<split>/``.

    Idempotent (:func:`gfocal.data.tiles.write_tiles`): returns at once when the manifests match
    ``spec`` and the sources, and every written file is intact; otherwise rebuilds.
    ``spec=None`` accepts an intact build made with any spec, else builds with the defaults.
    Returns ``root``.
    """
    root = root or tree_crowns_root()
    spec = spec or _built_spec(root) or TileSpec()
    spec.validate()
    records = {split: tree_source_records(split, source_dir) for split in TREE_SPLITS}
    for split, name in TREE_SPLITS.items():
        write_tiles(
            records[split], [CATEGORY_NAME], spec.split(split),
            os.path.join(root, f"instances_{split}.json"), os.path.join(root, split),
            description=f"NEON tree crowns from deepforest, {split}: tiles of {name}", force=force,
        )
    return root


def _lazy_loader(split: str, root: Optional[str]):
    def load() -> List[dict]:
        from detectron2.data.datasets import load_coco_json

        data_root = build_tree_crowns(root)
        return load_coco_json(
            os.path.join(data_root, f"instances_{split}.json"),
            os.path.join(data_root, split),
            f"neon_trees_{split}",
        )

    return load


def register_tree_crowns(root: Optional[str] = None) -> None:
    """Register ``neon_trees_train`` and ``neon_trees_val``; the data is built on first load.

    ``root`` defaults to :func:`tree_crowns_root` as seen at import time.
    """
    root = root or tree_crowns_root()
    for split in TREE_SPLITS:
        name = f"neon_trees_{split}"
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, _lazy_loader(split, root))
        MetadataCatalog.get(name).set(
            thing_classes=[CATEGORY_NAME],
            json_file=os.path.join(root, f"instances_{split}.json"),
            image_root=os.path.join(root, split),
            evaluator_type="coco",
        )


def register_tile_grid_subset(split: str = "train", step: int = 2) -> str:
    """Register and return ``neon_trees_<split>_every<step>``: the tiles of ``neon_trees_<split>``
    in every ``step``-th column and row of its tile grid and in the last ones (the ``window`` of
    each image in the split's COCO file), so that they still cover the whole image. With the main
    job's 400 px training tiles about 190 px apart (11 columns, 12 rows), step 2 keeps 42 of the
    132. Evaluated by COCOEvaluator through detectron2's conversion of the records (no
    ``json_file``). Step 1 is the split itself."""
    parent = f"neon_trees_{split}"
    if split not in TREE_SPLITS:
        raise ValueError(f"split {split!r} is not one of {sorted(TREE_SPLITS)}")
    if step < 1:
        raise ValueError(f"tile grid step {step} must be >= 1")
    if step == 1:
        return parent
    name = f"{parent}_every{step}"
    if name in DatasetCatalog.list():
        return name

    def load() -> List[dict]:
        records = DatasetCatalog.get(parent)
        with open(MetadataCatalog.get(parent).json_file) as f:
            windows = {im["id"]: im.get("window") for im in json.load(f)["images"]}
        if any(w is None for w in windows.values()):
            raise ValueError(f"{MetadataCatalog.get(parent).json_file}: images without a 'window' "
                             "(tiles written before windows were recorded: build them again)")

        def kept(axis: int) -> set:  # the grid's starts along x (0) or y (1) that stay
            starts = sorted({w[axis] for w in windows.values()})
            return {x for i, x in enumerate(starts) if i % step == 0 or i == len(starts) - 1}

        columns, rows = kept(0), kept(1)
        return [r for r in records if windows[r["image_id"]][0] in columns
                and windows[r["image_id"]][1] in rows]

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(thing_classes=[CATEGORY_NAME], evaluator_type="coco")
    return name
