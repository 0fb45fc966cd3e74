"""NEON aerial tree crowns (shipped inside the ``deepforest`` wheel) as tiled COCO datasets.

Two real photographs with hand-drawn crown boxes (Pascal VOC XML) become two splits:

* ``neon_trees_train``: tiles of ``2019_YELL_2_528000_4978000_image_crop2.png`` (574 boxes)
* ``neon_trees_val``: tiles of ``2019_YELL_2_541000_4977000_image_crop.png`` (279 boxes)

Tiling: square tiles of ``tile_size`` pixels; per axis the fewest tiles whose spacing is at most
``tile_size - overlap``, spread evenly from one image border to the other (no padding, so
neighbours may overlap a little more than ``overlap``).
Border rule: a box is clipped to the tile; it stays a normal annotation when at least
``min_visible`` of its area lies inside the tile, becomes an ``iscrowd=1`` annotation (ignored by
training and by the COCO evaluation) when less does, and is dropped when the clipped part is
thinner than ``min_side`` pixels.

:func:`build_tree_crowns` writes PNG tiles, ``instances_<split>.json`` and, last, a manifest with
the parameters and SHA-256 of every file; a later call with the same parameters and intact files
returns at once, otherwise it rebuilds. :func:`register_tree_crowns` registers the splits with
lazy loaders that build the data on first use.
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from typing import Dict, List, Optional, Tuple

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..tiling import tile_boxes, tile_grid

__all__ = [
    "TREE_SPLITS",
    "TileSpec",
    "build_tree_crowns",
    "deepforest_data_dir",
    "register_tree_crowns",
    "tile_grid",
    "tile_boxes",
    "tree_crowns_root",
]

logger = logging.getLogger(__name__)

# split -> source image in deepforest/data (its VOC XML has the same stem)
TREE_SPLITS: Dict[str, str] = {
    "train": "2019_YELL_2_528000_4978000_image_crop2.png",
    "val": "2019_YELL_2_541000_4977000_image_crop.png",
}
CATEGORY_NAME = "Tree"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # bump when the tiling code changes


@dataclass(frozen=True)
class TileSpec:
    """How images are cut into tiles and how border-cut boxes are treated (see module doc)."""

    tile_size: int = 400
    train_overlap: int = 200
    val_overlap: int = 0
    min_visible: float = 0.5
    min_side: float = 2.0

    def validate(self) -> None:
        if self.tile_size < 32:
            raise ValueError(f"tile_size={self.tile_size} must be >= 32 pixels")
        for name in ("train_overlap", "val_overlap"):
            value = getattr(self, name)
            if not 0 <= value < self.tile_size:
                raise ValueError(f"{name}={value} must be in [0, tile_size={self.tile_size})")
        if not 0.0 < self.min_visible <= 1.0:
            raise ValueError(f"min_visible={self.min_visible} must be in (0, 1]")
        if self.min_side < 0:
            raise ValueError(f"min_side={self.min_side} must be >= 0")


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


def read_voc_boxes(xml_path: str, image_hw: Tuple[int, int]) -> np.ndarray:
    """(N, 4) float XYXY boxes of one Pascal VOC file (:func:`~gfocal.data.formats.parse_voc_xml`),
    all labelled ``Tree`` and inside the image (the shipped files are; the tiling relies on it)."""
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


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_manifest(source_dir: str, spec: TileSpec) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "spec": asdict(spec),
        "sources": {
            split: _sha256(os.path.join(source_dir, name)) for split, name in TREE_SPLITS.items()
        },
    }


def _is_intact(root: str, expected: dict) -> bool:
    """Whether ``root`` holds a complete build with these parameters and undamaged files."""
    path = os.path.join(root, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if any(manifest.get(k) != v for k, v in expected.items()):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, digest in files.items():
        full = os.path.join(root, rel)
        if not os.path.isfile(full) or _sha256(full) != digest:
            logger.warning("Tree-crown data: %s is missing or damaged; rebuilding", full)
            return False
    return True


def _build_split(
    split: str, source_dir: str, root: str, spec: TileSpec
) -> Tuple[dict, List[str]]:
    import cv2

    name = TREE_SPLITS[split]
    image_path = os.path.join(source_dir, name)
    image = cv2.imread(image_path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {image_path}")
    boxes = read_voc_boxes(os.path.splitext(image_path)[0] + ".xml", image.shape[:2])
    overlap = spec.train_overlap if split == "train" else spec.val_overlap
    os.makedirs(os.path.join(root, split), exist_ok=True)

    images, annotations, files = [], [], []
    for tile_id, window in enumerate(tile_grid(image.shape[:2], spec.tile_size, overlap), start=1):
        x0, y0, x1, y1 = (int(v) for v in window)
        file_name = f"{os.path.splitext(name)[0]}_{x0}_{y0}.png"
        rel = os.path.join(split, file_name)
        if not cv2.imwrite(os.path.join(root, rel), image[y0:y1, x0:x1]):
            raise OSError(f"cannot write tile {os.path.join(root, rel)}")
        files.append(rel)
        images.append(
            {"id": tile_id, "file_name": file_name, "width": x1 - x0, "height": y1 - y0}
        )
        tile_xyxy, crowd = tile_boxes(boxes, window, spec.min_visible, spec.min_side)
        for (bx0, by0, bx1, by1), is_crowd in zip(tile_xyxy.tolist(), crowd.tolist()):
            w, h = bx1 - bx0, by1 - by0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": tile_id,
                    "category_id": 1,
                    "bbox": [bx0, by0, w, h],
                    "area": w * h,
                    "iscrowd": int(is_crowd),
                }
            )
    coco = {
        "info": {"description": f"NEON tree crowns from deepforest, {split}: tiles of {name}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": CATEGORY_NAME, "supercategory": "plant"}],
    }
    json_rel = f"instances_{split}.json"
    with open(os.path.join(root, json_rel), "w") as f:
        json.dump(coco, f)
    return coco, files + [json_rel]


def _built_spec(root: str) -> Optional[TileSpec]:
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            return TileSpec(**json.load(f)["spec"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_tree_crowns(
    root: Optional[str] = None,
    spec: Optional[TileSpec] = None,
    source_dir: Optional[str] = None,
    force: bool = False,
) -> str:
    """Build (or check) the tiled COCO datasets under ``root`` (default :func:`tree_crowns_root`).

    Idempotent: returns at once when the manifest matches ``spec`` and the source images and
    every written file is intact; otherwise (or with ``force``) removes ``root`` and rebuilds.
    ``spec=None`` accepts an intact build made with any spec, else builds with the defaults.
    Returns ``root``.
    """
    root = root or tree_crowns_root()
    spec = spec or _built_spec(root) or TileSpec()
    spec.validate()
    source_dir = source_dir or deepforest_data_dir()
    for name in TREE_SPLITS.values():
        for ext in (".png", ".xml"):
            path = os.path.join(source_dir, os.path.splitext(name)[0] + ext)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tree-crown source file {path} not found")
    expected = _expected_manifest(source_dir, spec)
    if not force and _is_intact(root, expected):
        return root
    # Several processes (training workers, parallel runs) may find the data missing at once:
    # one builds while the others wait, then find it intact.
    with _exclusive_lock(os.path.abspath(root) + ".lock"):
        if not force and _is_intact(root, expected):
            return root
        return _build(root, spec, source_dir, expected)


@contextlib.contextmanager
def _exclusive_lock(path: str):
    """An exclusive advisory lock on ``path`` (created if missing), released on exit."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build(root: str, spec: TileSpec, source_dir: str, expected: dict) -> str:
    logger.info("Building the tree-crown datasets under %s", root)
    if os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(root)
    files: List[str] = []
    for split in TREE_SPLITS:
        coco, split_files = _build_split(split, source_dir, root, spec)
        files += split_files
        logger.info(
            "  %s: %d tiles, %d boxes", split, len(coco["images"]), len(coco["annotations"])
        )
    manifest = dict(expected, files={rel: _sha256(os.path.join(root, rel)) for rel in files})
    tmp = os.path.join(root, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(root, MANIFEST))  # written last: its presence marks completion
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
