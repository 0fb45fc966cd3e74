"""Training and evaluation tiles from large annotated images, for any dataset format.

A dataset of whole images (detectron2 dataset dicts, e.g. from ``--dataset``) becomes a dataset
of windows of the one grid of :func:`gfocal.tiling.tile_grid` (``tile_size``, ``overlap``):

* **Box rule at the cuts** (:func:`gfocal.tiling.tile_boxes`): a box is clipped to the window;
  it stays a normal annotation when at least ``min_visible`` of its area lies inside, becomes
  ``iscrowd`` (dropped by training, ignored by the COCO evaluation) when less does, and is
  dropped when the clipped part is thinner than ``min_side`` pixels. Boxes are first clipped to
  their image; non-finite or empty boxes are dropped (counted in the log).
* **Empty tiles** (no normal box): ``empty_fraction`` of them are kept, chosen by a generator
  seeded with ``seed`` (1.0 keeps all; 0.0 none).

:func:`write_tiles` writes the tiles (PNG; a GeoTIFF source gives GeoTIFF tiles with their own
window transform and CRS) and a COCO instances JSON whose ``images`` also hold each tile's
``source`` image and ``window``, and whose ``sources`` list the whole images with their boxes
(what the whole-image evaluation stitches against). A manifest with the parameters and the
SHA-256 of every input and output file is written last; a later call with the same inputs and
intact files returns at once, otherwise it rebuilds (under a lock, so several worker processes
build once).
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.structures import BoxMode

from ..tiling import tile_boxes, tile_grid

__all__ = [
    "TilingSpec",
    "grid_tiles",
    "source_boxes",
    "tiles_are_intact",
    "write_tiles",
    "write_voc_csv",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the written tiles or JSON change
GEOTIFF_EXTENSIONS = (".tif", ".tiff")


@dataclass(frozen=True)
class TilingSpec:
    """How images are cut into windows and what happens to the boxes at the cuts (module doc)."""

    tile_size: int = 400
    overlap: int = 0
    min_visible: float = 0.5
    min_side: float = 2.0
    empty_fraction: float = 1.0
    seed: int = 0

    def validate(self, min_stride: int = 32, where: str = "DATASETS.TILING") -> None:
        """Refuse a tile below ``min_stride`` (the model's coarsest stride), an overlap not in
        [0, tile size) and fractions out of range; errors name the ``where.KEY``."""
        if self.tile_size < min_stride:
            raise ValueError(
                f"{where}.SIZE={self.tile_size} is below the model's coarsest stride {min_stride}: "
                "a tile must hold at least one cell of every feature level"
            )
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(
                f"{where}.OVERLAP={self.overlap} must be in [0, {where}.SIZE={self.tile_size})"
            )
        if not 0.0 < self.min_visible <= 1.0:
            raise ValueError(f"{where}.MIN_VISIBLE={self.min_visible} must be in (0, 1]")
        if self.min_side < 0:
            raise ValueError(f"{where}.MIN_SIDE={self.min_side} must be >= 0")
        if not 0.0 <= self.empty_fraction <= 1.0:
            raise ValueError(f"{where}.EMPTY_FRACTION={self.empty_fraction} must be in [0, 1]")


def source_boxes(record: dict) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(G, 4) XYXY boxes of one record clipped to its image, (G,) category ids and (G,) crowd
    flags; non-finite and empty boxes (before or after the clip) are left out."""
    boxes, classes, crowd = [], [], []
    height, width = record["height"], record["width"]
    for ann in record.get("annotations", []):
        box = BoxMode.convert(
            [float(v) for v in ann["bbox"]], ann.get("bbox_mode", BoxMode.XYXY_ABS), BoxMode.XYXY_ABS
        )
        boxes.append(box)
        classes.append(int(ann["category_id"]))
        crowd.append(bool(ann.get("iscrowd", 0)))
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(b).all(1)
    b = np.where(finite[:, None], b, 0.0)
    b = np.stack([b[:, 0].clip(0, width), b[:, 1].clip(0, height),
                  b[:, 2].clip(0, width), b[:, 3].clip(0, height)], 1)
    keep = finite & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b[keep], np.asarray(classes, dtype=np.int64)[keep], np.asarray(crowd, dtype=bool)[keep]


@dataclass
class Tile:
    """One window of one source image and its boxes in window pixels."""

    source: int  # index of the source record
    window: Tuple[int, int, int, int]  # XYXY in source pixels
    boxes: np.ndarray  # (K, 4) XYXY relative to the window
    classes: np.ndarray  # (K,)
    crowd: np.ndarray  # (K,) bool

    @property
    def empty(self) -> bool:
        return not bool((~self.crowd).any())


def grid_tiles(records: Sequence[dict], spec: TilingSpec) -> List[Tile]:
    """The tiles of every record in order (records in order, windows row by row), with the box
    rule applied and the empty tiles subsampled to ``spec.empty_fraction``."""
    tiles: List[Tile] = []
    for index, record in enumerate(records):
        boxes, classes, crowd = source_boxes(record)
        for window in tile_grid((record["height"], record["width"]), spec.tile_size, spec.overlap):
            keep_boxes, keep_crowd, keep = _window_boxes(boxes, window, spec)
            tiles.append(Tile(index, tuple(int(v) for v in window), keep_boxes,
                              classes[keep], keep_crowd | crowd[keep]))
    return _subsample_empty(tiles, spec)


def _window_boxes(boxes: np.ndarray, window: np.ndarray, spec: TilingSpec):
    """:func:`tile_boxes` plus which of the input boxes were kept (to carry classes along)."""
    x0, y0, x1, y1 = window
    w = boxes[:, 2].clip(x0, x1) - boxes[:, 0].clip(x0, x1)  # as tile_boxes measures them
    h = boxes[:, 3].clip(y0, y1) - boxes[:, 1].clip(y0, y1)
    side = max(spec.min_side, 1e-6)
    keep = (w >= side) & (h >= side)
    clipped, crowd = tile_boxes(boxes, window, spec.min_visible, spec.min_side)
    return clipped, crowd, keep


def _subsample_empty(tiles: List[Tile], spec: TilingSpec) -> List[Tile]:
    empty = [i for i, t in enumerate(tiles) if t.empty]
    if spec.empty_fraction >= 1.0 or not empty:
        return tiles
    count = int(round(spec.empty_fraction * len(empty)))
    rng = np.random.default_rng(spec.seed)
    kept = set(rng.choice(empty, size=count, replace=False).tolist()) if count else set()
    return [t for i, t in enumerate(tiles) if not t.empty or i in kept]


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _records_digest(records: Sequence[dict]) -> str:
    """A hash of the annotations (boxes, classes, crowd) of the records, in order."""
    digest = hashlib.sha256()
    for record in records:
        boxes, classes, crowd = source_boxes(record)
        digest.update(f"{record['file_name']}|{record['height']}x{record['width']}|".encode())
        digest.update(boxes.tobytes() + classes.tobytes() + crowd.tobytes())
    return digest.hexdigest()


def _expected_manifest(records: Sequence[dict], classes: Sequence[str], spec: TilingSpec) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "spec": asdict(spec),
        "classes": list(classes),
        "annotations": _records_digest(records),
        "sources": {r["file_name"]: _sha256(r["file_name"]) for r in records},
    }


def tiles_are_intact(json_path: str, expected: dict) -> bool:
    """Whether ``json_path`` is a complete build with these inputs and undamaged files."""
    try:
        with open(json_path + ".manifest") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if any(manifest.get(k) != v for k, v in expected.items()):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    root = os.path.dirname(os.path.abspath(json_path))
    for rel, digest in files.items():
        full = os.path.join(root, rel)
        if not os.path.isfile(full) or _sha256(full) != digest:
            logger.warning("Tiles: %s is missing or damaged; rebuilding", full)
            return False
    return True


@contextlib.contextmanager
def exclusive_lock(path: str):
    """An exclusive advisory lock on ``path`` (created if missing), released on exit."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_tiles(
    records: Sequence[dict],
    classes: Sequence[str],
    spec: TilingSpec,
    json_path: str,
    image_dir: Optional[str] = None,
    description: str = "",
    force: bool = False,
) -> str:
    """Write the tiles of ``records`` into ``image_dir`` (default: ``<json stem>/`` beside the
    JSON) and their COCO instances file ``json_path`` (category ids 1..K in ``classes`` order).

    Idempotent: returns at once when the manifest matches the inputs and every file is intact,
    otherwise (or with ``force``) removes ``image_dir`` and rebuilds. Returns ``json_path``.
    """
    spec.validate(min_stride=1)
    json_path = os.path.abspath(json_path)
    root = os.path.dirname(json_path)
    image_dir = os.path.abspath(image_dir or os.path.splitext(json_path)[0])
    if os.path.relpath(image_dir, root).startswith(".."):
        raise ValueError(f"tiles folder {image_dir} must lie under the JSON's folder {root}")
    for record in records:
        if not os.path.isfile(record["file_name"]):
            raise FileNotFoundError(f"source image {record['file_name']} does not exist")
    expected = _expected_manifest(records, classes, spec)
    if not force and tiles_are_intact(json_path, expected):
        return json_path
    # Several processes (training workers, parallel runs) may find the tiles missing at once:
    # one builds while the others wait, then find them intact.
    with exclusive_lock(json_path + ".lock"):
        if not force and tiles_are_intact(json_path, expected):
            return json_path
        _write(records, classes, spec, json_path, image_dir, description, expected)
    return json_path


def _tile_name(record: dict, window: Tuple[int, int, int, int], geotiff: bool) -> str:
    stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
    return f"{stem}_{window[0]}_{window[1]}{'.tif' if geotiff else '.png'}"


def _write(records, classes, spec, json_path, image_dir, description, expected) -> None:
    root = os.path.dirname(json_path)
    logger.info("Writing %s tiles of %d images into %s", spec.tile_size, len(records), image_dir)
    for stale in (json_path + ".manifest", json_path):
        if os.path.isfile(stale):
            os.remove(stale)  # a half-written build never looks complete
    if os.path.isdir(image_dir):
        shutil.rmtree(image_dir)
    os.makedirs(image_dir)
    tiles = grid_tiles(records, spec)
    images, annotations, files, seen = [], [], [], {}
    current, writer = None, None
    try:
        for tile_id, tile in enumerate(tiles, start=1):
            record = records[tile.source]
            if tile.source != current:
                if writer is not None:
                    writer.close()
                writer, current = _TileWriter(record["file_name"]), tile.source
            file_name = _tile_name(record, tile.window, writer.geotiff)
            if file_name in seen:
                raise ValueError(
                    f"tiles of {record['file_name']} and {seen[file_name]} get the same name "
                    f"{file_name}: give the source images different file names"
                )
            seen[file_name] = record["file_name"]
            writer.write(tile.window, os.path.join(image_dir, file_name))
            files.append(os.path.relpath(os.path.join(image_dir, file_name), root))
            x0, y0, x1, y1 = tile.window
            images.append({"id": tile_id, "file_name": file_name, "width": x1 - x0,
                           "height": y1 - y0, "source": tile.source, "window": list(tile.window)})
            for (bx0, by0, bx1, by1), cls, is_crowd in zip(
                tile.boxes.tolist(), tile.classes.tolist(), tile.crowd.tolist()
            ):
                w, h = bx1 - bx0, by1 - by0
                annotations.append({"id": len(annotations) + 1, "image_id": tile_id,
                                    "category_id": cls + 1, "bbox": [bx0, by0, w, h],
                                    "area": w * h, "iscrowd": int(is_crowd)})
    finally:
        if writer is not None:
            writer.close()
    sources = []
    for index, record in enumerate(records):
        boxes, cls, crowd = source_boxes(record)
        sources.append({"id": index, "file_name": record["file_name"], "height": record["height"],
                        "width": record["width"], "boxes": boxes.tolist(),
                        "category_ids": (cls + 1).tolist(), "iscrowd": crowd.astype(int).tolist()})
    coco = {
        "info": {"description": description or f"{spec.tile_size} px tiles", "tiling": asdict(spec)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c, "supercategory": c} for i, c in enumerate(classes)],
        "sources": sources,
    }
    with open(json_path, "w") as f:
        json.dump(coco, f)
    files.append(os.path.basename(json_path))
    manifest = dict(expected, files={rel: _sha256(os.path.join(root, rel)) for rel in files})
    tmp = json_path + ".manifest.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, json_path + ".manifest")  # written last: its presence marks completion
    num_crowd = sum(a["iscrowd"] for a in annotations)
    logger.info("  %d tiles, %d boxes (%d iscrowd) -> %s", len(images), len(annotations),
                num_crowd, json_path)


class _TileWriter:
    """Cuts windows out of one source image: GeoTIFF sources through rasterio (window reads,
    tiles written as GeoTIFF with the window's transform and the source's CRS), others decoded
    once by OpenCV and written as PNG."""

    def __init__(self, path: str):
        self.path = path
        self.geotiff = path.lower().endswith(GEOTIFF_EXTENSIONS)
        if self.geotiff:
            import rasterio

            self._src = rasterio.open(path)
        else:
            import cv2

            self._image = cv2.imread(path, cv2.IMREAD_COLOR)
            if self._image is None:
                raise OSError(f"cannot read image {path}")

    def write(self, window: Tuple[int, int, int, int], out_path: str) -> None:
        x0, y0, x1, y1 = window
        if self.geotiff:
            import rasterio
            from rasterio.windows import Window
            from rasterio.windows import transform as window_transform

            win = Window(x0, y0, x1 - x0, y1 - y0)
            data = self._src.read(window=win)
            profile = dict(self._src.profile, driver="GTiff", width=x1 - x0, height=y1 - y0,
                           transform=window_transform(win, self._src.transform))
            for key in ("blockxsize", "blockysize", "tiled"):
                profile.pop(key, None)
            with rasterio.open(out_path, "w", **profile) as dst:
                dst.write(data)
            return
        import cv2

        if not cv2.imwrite(out_path, np.ascontiguousarray(self._image[y0:y1, x0:x1])):
            raise OSError(f"cannot write tile {out_path}")

    def close(self) -> None:
        if self.geotiff:
            self._src.close()


def write_voc_csv(json_path: str, formats: Sequence[str] = ("voc", "csv")) -> List[str]:
    """Also write the tiles of a :func:`write_tiles` JSON as Pascal VOC XML (``voc/``, one per
    tile) and / or deepforest's CSV (``annotations.csv``, ``image_path`` relative to the tiles
    folder, a row 0,0,0,0 for a tile without boxes); iscrowd boxes are left out of both."""
    import csv
    import xml.etree.ElementTree as ET

    with open(json_path) as f:
        coco = json.load(f)
    root = os.path.dirname(os.path.abspath(json_path))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_image: Dict[int, list] = {}
    for a in coco["annotations"]:
        if not a["iscrowd"]:
            by_image.setdefault(a["image_id"], []).append(a)
    written = []
    if "voc" in formats:
        folder = os.path.join(root, "voc")
        os.makedirs(folder, exist_ok=True)
        for im in coco["images"]:
            ann = ET.Element("annotation")
            ET.SubElement(ann, "filename").text = im["file_name"]
            size = ET.SubElement(ann, "size")
            for key in ("width", "height"):
                ET.SubElement(size, key).text = str(im[key])
            ET.SubElement(size, "depth").text = "3"
            for a in by_image.get(im["id"], []):
                obj = ET.SubElement(ann, "object")
                ET.SubElement(obj, "name").text = names[a["category_id"]]
                ET.SubElement(obj, "difficult").text = "0"
                box = ET.SubElement(obj, "bndbox")
                x, y, w, h = a["bbox"]
                for key, v in zip(("xmin", "ymin", "xmax", "ymax"), (x, y, x + w, y + h)):
                    ET.SubElement(box, key).text = f"{v:g}"
            path = os.path.join(folder, os.path.splitext(im["file_name"])[0] + ".xml")
            ET.ElementTree(ann).write(path)
            written.append(path)
    if "csv" in formats:
        path = os.path.join(root, "annotations.csv")
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["image_path", "xmin", "ymin", "xmax", "ymax", "label"])
            for im in coco["images"]:
                anns = by_image.get(im["id"], [])
                if not anns:
                    out.writerow([im["file_name"], 0, 0, 0, 0, ""])
                for a in anns:
                    x, y, w, h = a["bbox"]
                    out.writerow([im["file_name"], f"{x:g}", f"{y:g}", f"{x + w:g}", f"{y + h:g}",
                                  names[a["category_id"]]])
        written.append(path)
    return written
