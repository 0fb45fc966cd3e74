"""``DATASETS.TILING``: the ``--dataset`` datasets of a YAML config cut into windows.

:func:`apply_dataset_tiling` (``train_net.py`` calls it in every process, before the data
checks) re-registers each ``--dataset`` dataset named in ``DATASETS.TRAIN`` / ``DATASETS.TEST``
under its own name:

* ``MODE "grid"``: the windows of :func:`gfocal.tiling.tile_grid` (``SIZE``, ``OVERLAP`` for
  training, ``TEST_OVERLAP`` for test datasets), written once as files with a COCO JSON by
  :func:`gfocal.data.tiles.write_tiles` under ``CACHE_DIR`` (default
  ``$DETECTRON2_DATASETS/tiles``), then read as a COCO dataset: deterministic, so the frozen
  backbone's feature cache holds them;
* ``MODE "crop"``: training datasets keep their whole images, each listed once per window of the
  grid (so an image is sampled in proportion to its area), and
  :class:`gfocal.data.tile_crop.TileCropMapper` cuts a random ``SIZE`` window at every load; test
  datasets use the grid;
* ``MODE ""``: nothing changes; a training dataset whose boxes the resize shrinks below the
  smallest anchor, or leaves without a positive anchor (more than ``WARN_UNASSIGNED_FRACTION``),
  gets a warning naming ``DATASETS.TILING.MODE`` and ``INPUT.MIN_SIZE_TRAIN``.
"""
import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..tiling import tile_grid
from .tiles import TilingSpec, write_tiles

__all__ = ["TILING_MODES", "apply_dataset_tiling", "coarsest_stride", "tiling_spec"]

logger = logging.getLogger(__name__)

TILING_MODES = ("", "grid", "crop")
# name -> (whole-image records, metadata dict) of the datasets this module re-registered
_WHOLE: Dict[str, Tuple[List[dict], dict]] = {}
_APPLIED: Dict[str, tuple] = {}  # name -> what it was re-registered with


def coarsest_stride(cfg) -> int:
    """The largest stride of ``MODEL.GFL.IN_FEATURES`` (levels named ``pN``: 2**N)."""
    from .analysis import level_strides

    return max(level_strides(list(cfg.MODEL.GFL.IN_FEATURES)))


def tiling_spec(cfg, train: bool) -> TilingSpec:
    """The :class:`TilingSpec` of ``DATASETS.TILING`` for training or test datasets, checked
    (errors name the key)."""
    t = cfg.DATASETS.TILING
    spec = TilingSpec(int(t.SIZE), int(t.OVERLAP if train else t.TEST_OVERLAP),
                      float(t.MIN_VISIBLE), float(t.MIN_SIDE), float(t.EMPTY_FRACTION), int(t.SEED))
    try:
        spec.validate(coarsest_stride(cfg))
    except ValueError as e:
        if not train and "OVERLAP" in str(e):
            raise ValueError(str(e).replace("DATASETS.TILING.OVERLAP", "DATASETS.TILING.TEST_OVERLAP")) from None
        raise
    return spec


def _cache_root(cfg) -> str:
    return cfg.DATASETS.TILING.CACHE_DIR or os.path.join(
        os.getenv("DETECTRON2_DATASETS", "datasets"), "tiles")


def _whole(name: str) -> Tuple[List[dict], dict]:
    if name not in _WHOLE:
        metadata = MetadataCatalog.get(name).as_dict()
        _WHOLE[name] = (list(DatasetCatalog.get(name)), metadata)
    return _WHOLE[name]


def _reregister(name: str, loader, metadata: dict) -> None:
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def _grid(cfg, name: str, spec: TilingSpec) -> str:
    from detectron2.data.datasets import load_coco_json

    records, metadata = _whole(name)
    classes = list(metadata["thing_classes"])
    key = hashlib.sha256(json.dumps([asdict(spec), classes, [r["file_name"] for r in records]])
                         .encode()).hexdigest()[:10]
    folder = os.path.join(_cache_root(cfg), f"{name}_{spec.tile_size}_{spec.overlap}_{key}")
    json_path = write_tiles(records, classes, spec, os.path.join(folder, "instances.json"),
                            os.path.join(folder, "images"), description=f"tiles of {name}")
    image_root = os.path.join(folder, "images")
    keep = {k: v for k, v in metadata.items() if k not in ("name", "json_file", "image_root",
                                                          "thing_dataset_id_to_contiguous_id")}
    _reregister(name, lambda: load_coco_json(json_path, image_root, name),
                dict(keep, json_file=json_path, image_root=image_root, tiling=asdict(spec)))
    return json_path


def _crop(name: str, spec: TilingSpec) -> None:
    records, metadata = _whole(name)
    repeated = []
    for record in records:
        count = len(tile_grid((record["height"], record["width"]), spec.tile_size, spec.overlap))
        repeated += [dict(record, tile_crop=True)] * count
    keep = {k: v for k, v in metadata.items() if k != "name"}
    _reregister(name, lambda: list(repeated), dict(keep, tiling=dict(asdict(spec), mode="crop")))
    logger.info("Dataset %r: %d images, %d random %d px crops per epoch", name, len(records),
                len(repeated), spec.tile_size)


def apply_dataset_tiling(cfg) -> List[str]:
    """Tile the ``--dataset`` datasets of ``cfg.DATASETS.TRAIN`` / ``TEST`` as ``DATASETS.TILING``
    says (module doc); returns the names changed. Idempotent for the same config."""
    from .register import registered_dataset_names

    mode = cfg.DATASETS.TILING.MODE
    if mode not in TILING_MODES:
        raise ValueError(f"DATASETS.TILING.MODE={mode!r} is not one of {list(TILING_MODES)}")
    ours = set(registered_dataset_names())
    train = [n for n in cfg.DATASETS.TRAIN if n in ours]
    test = [n for n in cfg.DATASETS.TEST if n in ours and n not in train]
    if not mode:
        for name in train:
            warn_if_boxes_too_small(cfg, name)
        return []
    _warn_feature_cache(cfg, mode)
    changed = []
    for names, is_train in ((train, True), (test, False)):
        if not names:
            continue
        spec = tiling_spec(cfg, is_train)
        for name in names:
            what = (mode if is_train else "grid", spec, _cache_root(cfg))
            if _APPLIED.get(name) == what:
                continue
            if what[0] == "crop":
                _crop(name, spec)
            else:
                _grid(cfg, name, spec)
            _APPLIED[name] = what
            changed.append(name)
    return changed


def _warn_feature_cache(cfg, mode: str) -> None:
    lite = cfg.MODEL.get("EFFICIENTNET_LITE")
    if lite is None or lite.FEATURE_CACHE_MB <= 0:
        return
    jitter = cfg.INPUT.get("SCALE_JITTER") is not None and cfg.INPUT.SCALE_JITTER.TYPE
    if mode == "crop" or jitter:
        why = "random crops (DATASETS.TILING.MODE 'crop')" if mode == "crop" else \
            f"scale jitter (INPUT.SCALE_JITTER.TYPE {cfg.INPUT.SCALE_JITTER.TYPE!r})"
        warnings.warn(
            f"MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB={lite.FEATURE_CACHE_MB} with {why}: every "
            "input is new, so the feature cache only costs memory and hashing; set "
            "MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB 0 (and a trainable backbone if wanted), or "
            "use DATASETS.TILING.MODE 'grid' without jitter", stacklevel=3)


def warn_if_boxes_too_small(cfg, name: str) -> Optional[str]:
    """The start-up warning of an untiled training dataset (module doc), or None."""
    from .analysis import records_boxes
    from .analysis_report import resize_check

    records = DatasetCatalog.get(name)
    classes = MetadataCatalog.get(name).get("thing_classes", None) or ["object"]
    images = records_boxes(records, name, max(len(classes), 1 + max(
        (a["category_id"] for r in records for a in r.get("annotations", [])), default=0)))
    check = resize_check(images, cfg)
    if check["warning"]:
        message = f"Dataset {name!r}: {check['warning']}"
        warnings.warn(message, stacklevel=3)
        logger.warning(message)
        return message
    return None
