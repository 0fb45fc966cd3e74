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

LazyConfig (``lazyconfig_train_net.py``): ``dataloader.tiling``, a dict of the same keys in lower
case (``dict(mode="grid", size=400, overlap=200)``; missing keys take the YAML defaults), applied
by :func:`apply_lazy_dataset_tiling` in ``lazy_setup`` to the ``--dataset`` datasets of
``dataloader.train.dataset.names`` / ``dataloader.test.dataset.names``. With ``mode="crop"`` the
training mapper becomes :class:`gfocal.data.tile_crop.TileCropMapper` (same arguments). Errors
and warnings name the LazyConfig keys.
"""
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..tiling import tile_grid
from .tiles import TilingSpec, write_tiles

__all__ = ["TILING_MODES", "apply_dataset_tiling", "apply_lazy_dataset_tiling", "coarsest_stride",
           "lazy_tiling_view", "tiling_spec"]

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
    jitter = jitter and not cfg.INPUT.get("AUG_VARIANTS", 0)  # finite variants are cacheable
    if mode == "crop" or jitter:
        why = "random crops (DATASETS.TILING.MODE 'crop')" if mode == "crop" else \
            f"scale jitter (INPUT.SCALE_JITTER.TYPE {cfg.INPUT.SCALE_JITTER.TYPE!r})"
        warnings.warn(
            f"MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB={lite.FEATURE_CACHE_MB} with {why}: every "
            "input is new, so the feature cache only costs memory and hashing; set "
            "MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB 0 (and a trainable backbone if wanted), or "
            "use DATASETS.TILING.MODE 'grid' without jitter or with INPUT.AUG_VARIANTS K > 0 (K "
            "fixed jitter draws per tile, which the cache holds)", stacklevel=3)


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


# ------------------------------------------------------------------------------------------------
# LazyConfig: dataloader.tiling
# ------------------------------------------------------------------------------------------------
def _lazy_names(dataset) -> List[str]:
    value = dataset.get("names", ()) if hasattr(dataset, "get") else ()
    return [value] if isinstance(value, str) else list(value)


def lazy_tiling_view(cfg):
    """A YAML config holding what :func:`apply_dataset_tiling` reads, taken from a LazyConfig:
    ``dataloader.tiling`` (lower-case DATASETS.TILING keys), the dataset names, the head's levels
    and anchors (``model.head_in_features``, ``anchor_scale``, ``anchor_offset``, ``topk``), the
    training resize (the train mapper's first ``ResizeShortestEdge``) and the backbone's
    ``feature_cache_mb``."""
    from detectron2.config import get_cfg

    from ..config import add_gfl_config

    view = get_cfg()
    add_gfl_config(view)
    tiling = dict(cfg.dataloader.get("tiling", None) or {})
    for key, value in tiling.items():
        if key.upper() not in view.DATASETS.TILING:
            raise ValueError(f"dataloader.tiling.{key}: not a tiling key; the keys are "
                             f"{sorted(k.lower() for k in view.DATASETS.TILING)}")
        view.DATASETS.TILING[key.upper()] = type(view.DATASETS.TILING[key.upper()])(value)
    train = cfg.dataloader.get("train", {})
    view.DATASETS.TRAIN = tuple(_lazy_names(train.get("dataset", {})))
    view.DATASETS.TEST = tuple(_lazy_names(cfg.dataloader.get("test", {}).get("dataset", {})))
    model = cfg.get("model", {})
    gfl = view.MODEL.GFL
    gfl.IN_FEATURES = list(model.get("head_in_features", gfl.IN_FEATURES))
    gfl.ANCHOR_SCALE = float(model.get("anchor_scale", gfl.ANCHOR_SCALE))
    gfl.ANCHOR_OFFSET = float(model.get("anchor_offset", gfl.ANCHOR_OFFSET))
    gfl.TOPK = int(model.get("topk", gfl.TOPK))
    for aug in train.get("mapper", {}).get("augmentations", []):
        if "short_edge_length" in aug:
            short = aug.short_edge_length
            view.INPUT.MIN_SIZE_TRAIN = tuple(short) if hasattr(short, "__len__") else (short,)
            view.INPUT.MAX_SIZE_TRAIN = int(aug.get("max_size", view.INPUT.MAX_SIZE_TRAIN))
            view.INPUT.MIN_SIZE_TRAIN_SAMPLING = aug.get("sample_style", "choice")
            break
    bottom_up = model.get("backbone", {}).get("bottom_up", {})
    view.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB = int(bottom_up.get("feature_cache_mb", 0) or 0)
    view.freeze()
    return view


_LAZY_KEYS = [
    (r"DATASETS\.TILING\.([A-Z_]+)", lambda m: "dataloader.tiling." + m.group(1).lower()),
    (r"INPUT\.MIN_SIZE_TRAIN", lambda m: "dataloader.train.mapper.augmentations[0]"
                                         ".short_edge_length"),
    (r"INPUT\.MAX_SIZE_TRAIN", lambda m: "dataloader.train.mapper.augmentations[0].max_size"),
    (r"MODEL\.EFFICIENTNET_LITE\.FEATURE_CACHE_MB",
     lambda m: "model.backbone.bottom_up.feature_cache_mb"),
]


def lazy_key_names(text: str) -> str:
    """A message of this module with the YAML keys replaced by their LazyConfig paths."""
    for pattern, repl in _LAZY_KEYS:
        text = re.sub(pattern, repl, text)
    return text


def apply_lazy_dataset_tiling(cfg) -> List[str]:
    """``dataloader.tiling`` of a LazyConfig (module doc): the ``--dataset`` datasets re-registered
    as :func:`apply_dataset_tiling` does (or the untiled warning), and with ``mode="crop"`` the
    training mapper made a :class:`~gfocal.data.tile_crop.TileCropMapper`. Returns the names
    changed."""
    view = lazy_tiling_view(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            changed = apply_dataset_tiling(view)
        except ValueError as e:
            raise ValueError(lazy_key_names(str(e))) from None
    for w in caught:
        text = str(w.message)
        if "DATASETS.TILING" in text or "FEATURE_CACHE_MB" in text:
            text = lazy_key_names(text)
            logger.warning(text)
        warnings.warn(text, w.category, stacklevel=2)
    if view.DATASETS.TILING.MODE == "crop" and "train" in cfg.dataloader:
        mapper = cfg.dataloader.train.mapper
        mapper._target_ = "gfocal.data.tile_crop.TileCropMapper"
        mapper.spec = asdict(tiling_spec(view, train=True))
    return changed
