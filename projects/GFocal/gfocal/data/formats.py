"""Readers of a user's detection annotations, returning detectron2 dataset dicts.

=========  ===========================================  ===========================================
format     ``PATH``                                     ``IMAGE_ROOT`` (default)
=========  ===========================================  ===========================================
``coco``   a COCO instances JSON file                   folder of its ``file_name`` s (JSON's
                                                        folder); detectron2's ``load_coco_json``:
                                                        category ids mapped to 0..K-1 in sorted id
                                                        order, names from ``categories``
``voc``    a folder of Pascal VOC XML files (one per    folder of the ``<filename>`` s (the XML
           image; what labelImg, CVAT and deepforest    folder); if that file is missing, an image
           write), or one such ``.xml`` file            of the XML's stem with another extension
``csv``    a CSV file with the header                   folder of the ``image_path`` s (the CSV's
           ``image_path,xmin,ymin,xmax,ymax,label``     folder); a row 0,0,0,0 is an image without
           (deepforest; extra columns are ignored)      boxes (deepforest's convention)
=========  ===========================================  ===========================================

Coordinates are absolute pixels, XYXY for VOC and CSV, taken as written (no 1-pixel shift:
deepforest and most tools write 0-based corners). VOC ``<difficult>`` objects are kept as normal boxes.
VOC and CSV class ids follow the order of ``classes`` (default: the sorted label names found).

Errors name the file and the object or row: a missing or unreadable image, malformed XML or CSV, a
non-number coordinate, a label not in ``classes``, an XML ``<size>`` unequal to the image's.
Boxes of zero size or (partly) outside the image are kept here and handled by the documented
drop/clip rules of :mod:`gfocal.data.annotations` at training time, which name them too.
Each annotation's ``id`` says where it came from (``"a.xml object 3"``, ``"train.csv line 12"``).
"""
import csv
import glob
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from detectron2.structures import BoxMode

__all__ = [
    "FORMATS",
    "DataFormatError",
    "VocObject",
    "collect_labels",
    "load_coco",
    "load_csv",
    "load_voc_folder",
    "parse_voc_xml",
]

FORMATS = ("coco", "voc", "csv")
CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label")
# The image files the project reads (dataset images, tools/demo.py and tools/predict.py inputs).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


class DataFormatError(ValueError):
    """An annotation file that cannot be read as its format; the message names file and row."""


@dataclass
class VocObject:
    name: str
    box: List[float]  # XYXY, as written
    difficult: bool


def _image_size(path: str, where: str) -> Tuple[int, int]:
    """(height, width) from the image header (PIL reads no pixels); errors name ``where``."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise DataFormatError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as e:
        raise DataFormatError(f"{where}: image {path} cannot be read ({e})") from e
    return height, width


def _number(text: Optional[str], where: str, field: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise DataFormatError(f"{where}: {field}={text!r} is not a number") from None


# ------------------------------------------------------------------------------------------------
# Pascal VOC
# ------------------------------------------------------------------------------------------------
def parse_voc_xml(xml_path: str) -> Tuple[str, Optional[Tuple[int, int]], List[VocObject]]:
    """(``<filename>``, (height, width) of ``<size>`` or None, objects) of one VOC XML file."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise DataFormatError(f"{xml_path}: malformed XML ({e})") from e
    except OSError as e:
        raise DataFormatError(f"{xml_path}: cannot be read ({e})") from e
    if root.tag != "annotation":
        raise DataFormatError(f"{xml_path}: root element <{root.tag}>, expected <annotation> (VOC)")
    filename = (root.findtext("filename") or "").strip()
    size = None
    size_node = root.find("size")
    if size_node is not None:
        w = _number(size_node.findtext("width"), f"{xml_path} <size>", "width")
        h = _number(size_node.findtext("height"), f"{xml_path} <size>", "height")
        size = (int(h), int(w)) if w > 0 and h > 0 else None
    objects = []
    for i, obj in enumerate(root.iter("object")):
        where = f"{xml_path} object {i}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataFormatError(f"{where}: no <name> (the label)")
        bb = obj.find("bndbox")
        if bb is None:
            raise DataFormatError(f"{where} ({name!r}): no <bndbox>")
        box = [_number(bb.findtext(k), where, k) for k in ("xmin", "ymin", "xmax", "ymax")]
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append(VocObject(name, box, difficult))
    return filename, size, objects


def _voc_files(folder: str) -> List[str]:
    if os.path.isfile(folder) and folder.lower().endswith(".xml"):
        return [folder]  # one annotation file
    if not os.path.isdir(folder):
        raise DataFormatError(f"VOC annotation folder {folder} does not exist")
    files = sorted(glob.glob(os.path.join(folder, "*.xml")))
    if not files:
        raise DataFormatError(f"VOC annotation folder {folder} has no .xml files")
    return files


def _voc_image_path(xml_path: str, filename: str, image_root: str) -> str:
    """``image_root/<filename>``; if missing, ``image_root/<xml stem>.<ext>`` or
    ``image_root/<filename stem>.<ext>`` (deepforest's OSBS_029.xml names a .tif beside a .png)."""
    if filename:
        path = os.path.join(image_root, filename)
        if os.path.isfile(path):
            return path
    stems = [os.path.splitext(os.path.basename(xml_path))[0]]
    if filename:
        stems.insert(0, os.path.splitext(filename)[0])
    for stem in stems:
        for ext in IMAGE_EXTENSIONS:
            for candidate in (stem + ext, stem + ext.upper()):
                path = os.path.join(image_root, candidate)
                if os.path.isfile(path):
                    return path
    named = f"<filename> {filename!r}" if filename else "no <filename>"
    raise DataFormatError(
        f"{xml_path}: image not found ({named}; looked in {image_root} for it and for "
        f"{stems[-1]}.* with extensions {list(IMAGE_EXTENSIONS)})"
    )


def _class_ids(classes: Sequence[str], source: str) -> Dict[str, int]:
    if len(set(classes)) != len(classes):
        raise DataFormatError(f"{source}: class list {list(classes)} names a class twice")
    return {name: i for i, name in enumerate(classes)}


def _label_id(ids: Dict[str, int], label: str, where: str) -> int:
    if label not in ids:
        raise DataFormatError(
            f"{where}: label {label!r} is not in the class list {list(ids)}; add it to --classes "
            "or fix the label"
        )
    return ids[label]


def load_voc_folder(
    folder: str, image_root: Optional[str] = None, classes: Optional[Sequence[str]] = None
) -> Tuple[List[dict], List[str]]:
    """Records of every ``*.xml`` in ``folder`` (sorted by name) and the class list used."""
    files = _voc_files(folder)
    image_root = image_root or (os.path.dirname(folder) if os.path.isfile(folder) else folder)
    parsed = [(path, *parse_voc_xml(path)) for path in files]
    if classes is None:
        classes = sorted({o.name for *_, objects in parsed for o in objects})
    ids = _class_ids(classes, folder)
    records = []
    for image_id, (xml_path, filename, size, objects) in enumerate(parsed, start=1):
        image_path = _voc_image_path(xml_path, filename, image_root)
        height, width = _image_size(image_path, xml_path)
        if size is not None and size != (height, width):
            raise DataFormatError(
                f"{xml_path}: <size> says {size[1]}x{size[0]} (width x height) but image "
                f"{image_path} is {width}x{height}"
            )
        annotations = [
            {
                "id": f"{os.path.basename(xml_path)} object {i}",
                "bbox": obj.box,
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": _label_id(ids, obj.name, f"{xml_path} object {i}"),
                "iscrowd": 0,
            }
            for i, obj in enumerate(objects)
        ]
        records.append(
            {"file_name": image_path, "image_id": image_id, "height": height, "width": width,
             "annotations": annotations}
        )
    return records, list(classes)


# ------------------------------------------------------------------------------------------------
# CSV (deepforest)
# ------------------------------------------------------------------------------------------------
def _read_csv_rows(csv_path: str) -> List[Tuple[int, dict]]:
    """(line number, row) of a CSV with at least :data:`CSV_COLUMNS`."""
    if not os.path.isfile(csv_path):
        raise DataFormatError(f"CSV annotation file {csv_path} does not exist")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise DataFormatError(
                    f"{csv_path} line 1: header {header} lacks {missing}; expected "
                    f"{','.join(CSV_COLUMNS)}"
                )
            reader.fieldnames = header
            rows = []
            for row in reader:
                line = reader.line_num
                if None in row or any(row.get(c) is None for c in CSV_COLUMNS):
                    # DictReader: surplus fields under the key None, missing ones as None values
                    fields = sum(v is not None for k, v in row.items() if k is not None)
                    fields += len(row.get(None) or [])
                    raise DataFormatError(
                        f"{csv_path} line {line}: {fields} fields, expected the {len(header)} "
                        f"columns {header}"
                    )
                rows.append((line, {k: v.strip() for k, v in row.items()}))
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{csv_path}: not a UTF-8 text file ({e})") from e
    except csv.Error as e:
        raise DataFormatError(f"{csv_path}: malformed CSV ({e})") from e
    return rows


def load_csv(
    csv_path: str, image_root: Optional[str] = None, classes: Optional[Sequence[str]] = None
) -> Tuple[List[dict], List[str]]:
    """Records of a deepforest-style CSV (images in order of first appearance), class list."""
    rows = _read_csv_rows(csv_path)
    if not rows:
        raise DataFormatError(f"{csv_path}: no rows after the header")
    image_root = image_root or os.path.dirname(os.path.abspath(csv_path))
    if classes is None:
        classes = sorted({r["label"] for _, r in rows if r["label"]})
    ids = _class_ids(classes, csv_path)
    name = os.path.basename(csv_path)
    records: Dict[str, dict] = {}
    for line, row in rows:
        where = f"{csv_path} line {line}"
        if not row["image_path"]:
            raise DataFormatError(f"{where}: empty image_path")
        path = os.path.join(image_root, row["image_path"])
        if path not in records:
            height, width = _image_size(path, where)
            records[path] = {"file_name": path, "image_id": len(records) + 1, "height": height,
                             "width": width, "annotations": []}
        box = [_number(row[k], where, k) for k in ("xmin", "ymin", "xmax", "ymax")]
        if all(v == 0 for v in box):
            continue  # deepforest: an image without boxes
        records[path]["annotations"].append(
            {"id": f"{name} line {line}", "bbox": box, "bbox_mode": BoxMode.XYXY_ABS,
             "category_id": _label_id(ids, row["label"], where), "iscrowd": 0}
        )
    return list(records.values()), list(classes)


# ------------------------------------------------------------------------------------------------
# COCO
# ------------------------------------------------------------------------------------------------
def load_coco(
    json_path: str, image_root: Optional[str], dataset_name: str
) -> Tuple[List[dict], List[str]]:
    """detectron2's ``load_coco_json`` (which also sets ``thing_classes`` and the id mapping in
    the metadata of ``dataset_name``), with the image files checked."""
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    if not os.path.isfile(json_path):
        raise DataFormatError(f"COCO annotation file {json_path} does not exist")
    image_root = image_root or os.path.dirname(os.path.abspath(json_path))
    try:
        records = load_coco_json(json_path, image_root, dataset_name)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise DataFormatError(
            f"{json_path}: not a COCO instances file ({type(e).__name__}: {e})"
        ) from e
    for record in records:
        if not os.path.isfile(record["file_name"]):
            raise DataFormatError(
                f"{json_path}: image id {record['image_id']}: image {record['file_name']} "
                "does not exist"
            )
    return records, list(MetadataCatalog.get(dataset_name).thing_classes)


def collect_labels(specs: Iterable[Tuple[str, str]]) -> List[str]:
    """Sorted union of the labels of VOC folders / CSV files, given as (format, path) pairs."""
    labels = set()
    for fmt, path in specs:
        if fmt == "voc":
            for xml_path in _voc_files(path):
                labels.update(o.name for o in parse_voc_xml(xml_path)[2])
        elif fmt == "csv":
            labels.update(r["label"] for _, r in _read_csv_rows(path) if r["label"])
    return sorted(labels)
