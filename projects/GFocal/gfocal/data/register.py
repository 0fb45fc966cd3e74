"""Datasets from the command line: ``--dataset NAME=FORMAT:PATH[:IMAGE_ROOT]`` (repeatable) and
``--classes A,B,...``, registered in detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

FORMAT is one of :data:`gfocal.data.formats.FORMATS` (``coco``, ``voc``, ``csv``; see that module
for PATH and the default IMAGE_ROOT). The files are read and checked when the dataset is
registered, before a tool writes anything; ``thing_classes`` goes into the metadata (the
Visualizer, the evaluators and the demo show names). VOC and CSV datasets given together share one
class list: ``--classes`` in that order, else the sorted union of their labels, so a validation set
missing a class keeps the training set's ids. A COCO dataset keeps its own categories.

Tools call :func:`add_dataset_arguments` on their parser and :func:`register_datasets_from_args`
in every process that reads the data (``train_net.py``'s ``main`` runs in each worker).
"""
import argparse
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .formats import FORMATS, DataFormatError, collect_labels, load_coco, load_csv, load_voc_folder

__all__ = [
    "DatasetSpec",
    "add_dataset_arguments",
    "check_datasets",
    "parse_dataset_spec",
    "register_datasets",
    "register_datasets_from_args",
    "registered_dataset_names",
]

logger = logging.getLogger(__name__)

SPEC_SYNTAX = "NAME=FORMAT:PATH[:IMAGE_ROOT]"
# name -> (spec, classes) of the datasets registered by this module in this process
_REGISTERED: Dict[str, Tuple["DatasetSpec", Tuple[str, ...]]] = {}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    format: str
    path: str
    image_root: Optional[str] = None

    def __str__(self) -> str:
        root = f":{self.image_root}" if self.image_root else ""
        return f"{self.name}={self.format}:{self.path}{root}"


def parse_dataset_spec(text: str) -> DatasetSpec:
    """``NAME=FORMAT:PATH[:IMAGE_ROOT]`` -> :class:`DatasetSpec` (errors quote the text)."""
    name, sep, rest = text.partition("=")
    fmt, sep2, paths = rest.partition(":")
    if not sep or not sep2 or not name.strip() or not paths:
        raise ValueError(f"--dataset {text!r}: expected {SPEC_SYNTAX}, e.g. mytrees=voc:data/xml")
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"--dataset {text!r}: format {fmt!r} is not one of {list(FORMATS)}")
    path, _, image_root = paths.partition(":")
    return DatasetSpec(name.strip(), fmt, path, image_root or None)


def registered_dataset_names() -> List[str]:
    """Names of the datasets registered by ``--dataset`` in this process."""
    return list(_REGISTERED)


def _parse_classes(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    classes = [c.strip() for c in text.split(",")]
    if not all(classes):
        raise ValueError(f"--classes {text!r}: an empty class name; give names separated by commas")
    return classes


def add_dataset_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--dataset`` (repeatable) and ``--classes`` to a tool's parser."""
    parser.add_argument(
        "--dataset", action="append", default=[], metavar=SPEC_SYNTAX,
        help="register a dataset from your annotations (repeatable), FORMAT one of "
        f"{', '.join(FORMATS)}: coco (PATH a COCO JSON), voc (PATH a folder of Pascal VOC XML), "
        "csv (PATH a CSV image_path,xmin,ymin,xmax,ymax,label); IMAGE_ROOT defaults to PATH's "
        "folder. Use NAME in DATASETS.TRAIN / DATASETS.TEST.",
    )
    parser.add_argument(
        "--classes", default=None, metavar="A,B,...",
        help="class names of the voc/csv datasets in id order (default: their labels, sorted)",
    )
    return parser


def register_datasets_from_args(args: argparse.Namespace) -> List[str]:
    """Register the datasets of :func:`add_dataset_arguments`'s flags; returns their names."""
    specs = [parse_dataset_spec(text) for text in getattr(args, "dataset", None) or []]
    return register_datasets(specs, _parse_classes(getattr(args, "classes", None)))


def register_datasets(
    specs: Sequence[DatasetSpec], classes: Optional[Sequence[str]] = None
) -> List[str]:
    """Read, check and register ``specs``; idempotent for the same specs in one process."""
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--dataset: name(s) {twice} given more than once; each NAME once")
    if classes is None:
        classes = collect_labels((s.format, s.path) for s in specs if s.format != "coco")
    classes = tuple(classes)
    for spec in specs:
        if spec.name in DatasetCatalog.list() and _REGISTERED.get(spec.name) != (spec, classes):
            raise ValueError(
                f"--dataset {spec}: a dataset named {spec.name!r} is already registered "
                f"({'by another --dataset' if spec.name in _REGISTERED else 'built in'}); "
                "choose another NAME"
            )
    for spec in specs:
        if spec.name not in _REGISTERED:
            _register(spec, list(classes))
    return names


def _register(spec: DatasetSpec, classes: List[str]) -> None:
    try:
        if spec.format == "coco":
            records, thing_classes = load_coco(spec.path, spec.image_root, spec.name)
        elif spec.format == "voc":
            records, thing_classes = load_voc_folder(spec.path, spec.image_root, classes)
        else:
            records, thing_classes = load_csv(spec.path, spec.image_root, classes)
    except DataFormatError as e:
        raise DataFormatError(f"--dataset {spec}: {e}") from e
    if not records:
        raise DataFormatError(f"--dataset {spec}: no images")
    DatasetCatalog.register(spec.name, lambda: list(records))
    metadata = {"thing_classes": thing_classes, "evaluator_type": "coco", "dataset_spec": str(spec)}
    if spec.format == "coco":
        metadata.update(json_file=spec.path, image_root=spec.image_root or os.path.dirname(
            os.path.abspath(spec.path)))
    # VOC / CSV: no json_file; COCOEvaluator writes a COCO copy under its output folder.
    MetadataCatalog.get(spec.name).set(**metadata)
    _REGISTERED[spec.name] = (spec, tuple(classes))
    num_boxes = sum(len(r.get("annotations", [])) for r in records)
    logger.info("Registered dataset %r (%s): %d images, %d boxes, classes %s", spec.name,
                spec.format, len(records), num_boxes, thing_classes)


def check_datasets(
    names: Sequence[str], num_classes: int, key: str = "MODEL.GFL.NUM_CLASSES"
) -> None:
    """Before anything is written: every name registered, one class list, ``num_classes`` equal
    to its length (the error says which ``key`` to set to what)."""
    from .annotations import check_num_classes

    names = list(dict.fromkeys(names))
    missing = [n for n in names if n not in DatasetCatalog.list()]
    if missing:
        raise ValueError(
            f"dataset(s) {missing} are not registered; register your own with --dataset "
            f"{SPEC_SYNTAX} (e.g. --dataset {missing[0]}=voc:path/to/xml_folder)"
        )
    lists = {n: MetadataCatalog.get(n).get("thing_classes", None) for n in names}
    known = {n: list(c) for n, c in lists.items() if c is not None}
    if len({tuple(c) for c in known.values()}) > 1:
        raise ValueError(
            f"datasets have different class lists {known}; give them the same classes "
            "(e.g. --classes A,B,... for voc/csv datasets)"
        )
    check_num_classes(names, num_classes, key=key)
