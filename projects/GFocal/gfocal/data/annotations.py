"""Checks and clean-up of detection annotations before training.

Rules (per annotation of a detectron2 dataset dict; "error" stops before training starts):

==========================================  ================================================
case                                        rule
==========================================  ================================================
``category_id`` not an integer in           error naming dataset, image id, annotation id
[0, NUM_CLASSES)
``bbox`` not 4 numbers, or a ``bbox_mode``  error naming dataset, image id, annotation id
other than XYXY_ABS / XYWH_ABS
``iscrowd`` = 1                             dropped, counted (GFL has no ignore regions;
                                            the reference and detectron2 drop them too)
NaN or infinite coordinate                  dropped, counted
zero or negative width or height            dropped, counted
partly outside the image                    clipped to the image, counted
wholly outside the image                    dropped, counted
no boxes left in an image                   the image is kept as all-negative, or removed by
                                            ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``
hundreds of boxes                           kept (ATSS is batched; see docs/reliability.md)
an image file missing on disk               error naming the first few and the count
==========================================  ================================================

Clipping needs the record's ``height`` and ``width``; without them the box is kept as it is and
detectron2's mapper clips it after the augmentation. Kept boxes are written as XYXY_ABS.
"""
import logging
import math
import os
import numbers
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import (
    filter_images_with_only_crowd_annotations,
    print_instances_class_histogram,
)
from detectron2.structures import BoxMode

__all__ = ["sanitize_annotations", "check_num_classes", "check_image_files",
           "load_train_dataset_dicts", "DROP_REASONS"]

logger = logging.getLogger(__name__)

DROP_REASONS = ("crowd", "non-finite", "empty", "outside")
_BOX_MODES = (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)


def _where(dataset_name: str, record: dict, index: int, ann: dict) -> str:
    image_id = record.get("image_id", record.get("file_name", "?"))
    ann_id = ann["id"] if "id" in ann else f"#{index} (no 'id' field)"
    return f"dataset '{dataset_name}', image id {image_id}, annotation id {ann_id}"


def _check_class(ann: dict, num_classes: int, where: str) -> None:
    cls = ann.get("category_id")
    is_int = isinstance(cls, numbers.Integral) and not isinstance(cls, bool)
    if not is_int or not 0 <= cls < num_classes:
        raise ValueError(
            f"{where}: category_id={cls!r} is not an integer in [0, {num_classes - 1}] "
            f"(MODEL.GFL.NUM_CLASSES={num_classes}); fix the dataset's class mapping"
        )


def _xyxy(ann: dict, where: str) -> List[float]:
    bbox, mode = ann.get("bbox"), ann.get("bbox_mode", BoxMode.XYXY_ABS)
    if mode not in _BOX_MODES:
        raise ValueError(f"{where}: bbox_mode={mode!r} is not one of {[str(m) for m in _BOX_MODES]}")
    try:
        coords = [float(v) for v in bbox]
    except (TypeError, ValueError):
        coords = []
    if len(coords) != 4:
        raise ValueError(f"{where}: bbox={bbox!r} is not 4 numbers")
    if not all(math.isfinite(v) for v in coords):
        return coords
    return list(BoxMode.convert(coords, mode, BoxMode.XYXY_ABS))


def _clean_box(
    box: List[float], image_size: Optional[Tuple[int, int]]
) -> Tuple[Optional[List[float]], Optional[str], bool]:
    """(kept XYXY box or None, reason it was dropped, whether it was clipped)."""
    if not all(math.isfinite(v) for v in box):
        return None, "non-finite", False
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return None, "empty", False
    if image_size is None:
        return box, None, False
    h, w = image_size
    clipped = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, "outside", False
    return clipped, None, clipped != box


def sanitize_annotations(
    dataset_dicts: Sequence[dict], dataset_name: str, num_classes: int
) -> Tuple[List[dict], Dict[str, int]]:
    """Apply the rules of this module to the records of one dataset. The input is not modified.

    Returns:
        the cleaned records (same order, same images) and counts per rule:
        the :data:`DROP_REASONS`, "clipped" and "kept".
    """
    counts: Counter = Counter()
    examples: Dict[str, str] = {}
    cleaned = []
    for record in dataset_dicts:
        if "annotations" not in record:
            cleaned.append(record)
            continue
        image_size = (record["height"], record["width"]) if "height" in record and "width" in record else None
        kept = []
        for index, ann in enumerate(record["annotations"]):
            where = _where(dataset_name, record, index, ann)
            _check_class(ann, num_classes, where)
            box = _xyxy(ann, where)
            reason = "crowd" if ann.get("iscrowd", 0) else None
            clipped = False
            if reason is None:
                box, reason, clipped = _clean_box(box, image_size)
            if reason is not None:
                counts[reason] += 1
                examples.setdefault(reason, f"{where}, bbox {ann.get('bbox')}")
                continue
            counts["clipped"] += int(clipped)
            counts["kept"] += 1
            kept.append({**ann, "bbox": box, "bbox_mode": BoxMode.XYXY_ABS})
        cleaned.append({**record, "annotations": kept})
    _log_counts(dataset_name, counts, examples)
    return cleaned, {k: counts[k] for k in DROP_REASONS + ("clipped", "kept")}


def _log_counts(dataset_name: str, counts: Counter, examples: Dict[str, str]) -> None:
    dropped = {k: counts[k] for k in DROP_REASONS if counts[k]}
    if not dropped and not counts["clipped"]:
        return
    lines = [f"Dataset '{dataset_name}': kept {counts['kept']} boxes, clipped {counts['clipped']} "
             f"to their image, dropped {dropped}."]
    lines += [f"  first dropped as {k}: {examples[k]}" for k in dropped]
    logger.warning("\n".join(lines))


YAML_NUM_CLASSES_KEY = "MODEL.GFL.NUM_CLASSES"
LAZY_NUM_CLASSES_KEY = "model.num_classes"


def check_num_classes(
    dataset_names: Sequence[str], num_classes: int, key: str = YAML_NUM_CLASSES_KEY
) -> None:
    """Refuse ``num_classes`` (the config ``key``) unequal to the datasets' number of
    ``thing_classes``; the message says which key to set to what."""
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            n = len(classes)  # a LazyConfig sets the model's and the train loader's count
            how = f"{key} {n}" if key == YAML_NUM_CLASSES_KEY else (
                f"{LAZY_NUM_CLASSES_KEY}={n} dataloader.train.dataset.num_classes={n}")
            raise ValueError(
                f"{key}={num_classes} does not match dataset '{name}', whose "
                f"metadata has {len(classes)} thing_classes {list(classes)[:5]}"
                f"{'...' if len(classes) > 5 else ''}; set {how}"
            )


def check_image_files(dataset_dicts: Sequence[dict], dataset_name: str, show: int = 5) -> None:
    """Refuse a dataset whose image files are missing: a stat of each local ``file_name`` before
    training, instead of a FileNotFoundError in a loader worker when that image is sampled.
    Names with a scheme (``s3://``, ...) are left to detectron2's PathManager."""
    missing = [r["file_name"] for r in dataset_dicts
               if "file_name" in r and "://" not in str(r["file_name"])
               and not os.path.isfile(r["file_name"])]
    if missing:
        raise FileNotFoundError(
            f"Dataset '{dataset_name}': {len(missing)} of its {len(dataset_dicts)} image files do "
            f"not exist, e.g. {missing[:show]}; check the image root of its registration"
        )


def load_train_dataset_dicts(cfg) -> List[dict]:
    """The records of ``cfg.DATASETS.TRAIN``, checked and cleaned by the rules of this module,
    then filtered like detectron2's ``get_detection_dataset_dicts``."""
    return train_dataset_dicts(
        list(cfg.DATASETS.TRAIN),
        cfg.MODEL.GFL.NUM_CLASSES,
        cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        num_classes_key=YAML_NUM_CLASSES_KEY,
    )


def train_dataset_dicts(
    names: Sequence[str], num_classes: int, filter_empty: bool = True,
    num_classes_key: str = "dataloader.train.dataset.num_classes",
) -> List[dict]:
    """:func:`load_train_dataset_dicts` with explicit arguments (the LazyConfig configs)."""
    names = [names] if isinstance(names, str) else list(names)
    check_num_classes(names, num_classes, key=num_classes_key)
    dicts: List[dict] = []
    for name in names:
        records = DatasetCatalog.get(name)
        if not len(records):
            raise ValueError(f"Dataset '{name}' (DATASETS.TRAIN) is empty")
        check_image_files(records, name)
        dicts.extend(sanitize_annotations(records, name, num_classes)[0])
    if filter_empty:
        dicts = filter_images_with_only_crowd_annotations(dicts)
    if not dicts:
        raise ValueError(f"No training image with a valid box in {names}")
    classes = MetadataCatalog.get(names[0]).get("thing_classes", None)
    if classes is not None:
        print_instances_class_histogram(dicts, classes)
    return dicts
