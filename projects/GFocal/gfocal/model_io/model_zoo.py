"""Published GFL COCO models (mmdetection v2 model zoo) as detectron2 models.

    from gfocal import model_zoo
    model = model_zoo.get("mmdet/gfl_R_50_FPN_1x")            # converted weights, eval mode
    cfg = model_zoo.get_config("mmdet/gfl_R_50_FPN_1x")       # for DefaultPredictor(cfg)

GFocalV2 (GFLv2, DGQP) models are ``model_zoo.get("mmdet/gfocalv2_R_50_FPN_1x")`` etc.
(:data:`GFLV2_MODELS`): their authors publish them only as Google Drive links, with no file name
and no checksum, so they are not downloaded: the error names the link and where to put the file.

The first call downloads the mmdetection checkpoint into the cache (``$GFOCAL_CACHE``, default
``~/.cache/gfocal``; or the ``cache_dir`` argument), checks it against the sha256 prefix in its
file name, converts it once (``converted/<name>.pth``) and reuses it afterwards. Without network
access the error says which file to fetch and where to put it.
"""
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from detectron2.config import CfgNode

from ..config import load_config

__all__ = ["ZooEntry", "MODELS", "GFLV2_MODELS", "list_models", "get_config_file", "get_config", "get_checkpoint", "get"]

_URL_BASE = "https://download.openmmlab.com/mmdetection/v2.0/gfl/"


@dataclass(frozen=True)
class ZooEntry:
    """One published checkpoint: our config, its URL and the COCO box AP mmdetection reports."""

    config: str  # relative to the repository's configs/ folder
    url: str
    ap: float
    opts: Tuple[str, ...] = ()  # config overrides, KEY VALUE ...
    # For a link that is a web page, not a file (Google Drive): the name the downloaded file is
    # given in the cache. Such files are fetched by hand and have no published checksum.
    cache_name: str = ""

    @property
    def filename(self) -> str:
        return self.cache_name or self.url.rsplit("/", 1)[-1]

    @property
    def manual_download(self) -> bool:
        return bool(self.cache_name)


def _entry(config: str, path: str, ap: float) -> ZooEntry:
    return ZooEntry(f"mmdet/{config}.yaml", _URL_BASE + path, ap)


MODELS: Dict[str, ZooEntry] = {
    "mmdet/gfl_R_50_FPN_1x": _entry(
        "gfl_R_50_FPN_1x", "gfl_r50_fpn_1x_coco/gfl_r50_fpn_1x_coco_20200629_121244-25944287.pth", 40.2
    ),
    "mmdet/gfl_R_50_FPN_ms2x": _entry(
        "gfl_R_50_FPN_ms2x",
        "gfl_r50_fpn_mstrain_2x_coco/gfl_r50_fpn_mstrain_2x_coco_20200629_213802-37bb1edc.pth",
        42.9,
    ),
    "mmdet/gfl_R_101_FPN_ms2x": _entry(
        "gfl_R_101_FPN_ms2x",
        "gfl_r101_fpn_mstrain_2x_coco/gfl_r101_fpn_mstrain_2x_coco_20200629_200126-dd12f847.pth",
        44.7,
    ),
    "mmdet/gfl_R_101_dconv_c3-c5_FPN_ms2x": _entry(
        "gfl_R_101_dconv_c3-c5_FPN_ms2x",
        "gfl_r101_fpn_dconv_c3-c5_mstrain_2x_coco/"
        "gfl_r101_fpn_dconv_c3-c5_mstrain_2x_coco_20200630_102002-134b07df.pth",
        47.1,
    ),
    "mmdet/gfl_X_101_32x4d_FPN_ms2x": _entry(
        "gfl_X_101_32x4d_FPN_ms2x",
        "gfl_x101_32x4d_fpn_mstrain_2x_coco/"
        "gfl_x101_32x4d_fpn_mstrain_2x_coco_20200630_102002-50c1ffdb.pth",
        45.9,
    ),
    "mmdet/gfl_X_101_32x4d_dconv_c4-c5_FPN_ms2x": _entry(
        "gfl_X_101_32x4d_dconv_c4-c5_FPN_ms2x",
        "gfl_x101_32x4d_fpn_dconv_c4-c5_mstrain_2x_coco/"
        "gfl_x101_32x4d_fpn_dconv_c4-c5_mstrain_2x_coco_20200630_102002-14a2bf25.pth",
        48.1,
    ),
}


_GDRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"


def _gflv2(config: str, drive_id: str, ap: float, published_name: str) -> ZooEntry:
    return ZooEntry(f"mmdet/{config}.yaml", _GDRIVE.format(drive_id), ap, cache_name=published_name + ".pth")


# GFocalV2 README (implus/GFocalV2): model name, COCO minival AP, Google Drive link. The cache
# name is the README's model name + ".pth" (the README gives no file names). Its Res2Net-101 model
# (GFocal_R2_101_dcnv2_FPN_2x) is not here: this project has no Res2Net backbone.
GFLV2_MODELS: Dict[str, ZooEntry] = {
    "mmdet/gfocalv2_R_50_FPN_1x": _gflv2(
        "gfocalv2_R_50_FPN_1x", "1wSE9-c7tcQwIDPC6Vm_yfOokdPfmYmy7", 41.0, "GFocal_R_50_FPN_1x"
    ),
    "mmdet/gfocalv2_R_50_FPN_ms2x": _gflv2(
        "gfocalv2_R_50_FPN_ms2x", "17-1cKRdR5J3SfZ9NBCwe6QE554uTS30F", 43.9, "GFocal_R_50_FPN_2x"
    ),
    "mmdet/gfocalv2_R_101_FPN_ms2x": _gflv2(
        "gfocalv2_R_101_FPN_ms2x", "1qomgA7mzKW0bwybtG4Avqahv67FUxmNx", 45.8, "GFocal_R_101_FPN_2x"
    ),
    "mmdet/gfocalv2_R_101_dconv_c3-c5_FPN_ms2x": _gflv2(
        "gfocalv2_R_101_dconv_c3-c5_FPN_ms2x",
        "1xsBjxmqsJoYZYPMr0k06X5K9nnPrexcx",
        48.0,
        "GFocal_R_101_dcnv2_FPN_2x",
    ),
    "mmdet/gfocalv2_X_101_32x4d_dconv_c4-c5_FPN_ms2x": _gflv2(
        "gfocalv2_X_101_32x4d_dconv_c4-c5_FPN_ms2x",
        "1AHDVQoclYPSP0Ync2a5FCsr_rhq2QdMH",
        48.8,
        "GFocal_X_101_dcnv2_FPN_2x",
    ),
}


def list_models() -> List[str]:
    """Names of the GFL (mmdetection) and GFocalV2 zoo models."""
    return sorted(MODELS) + sorted(GFLV2_MODELS)


def _lookup(name: str) -> Tuple[str, ZooEntry]:
    key = name[: -len(".yaml")] if name.endswith(".yaml") else name
    key = key if key.startswith("mmdet/") else f"mmdet/{key}"
    entry = MODELS.get(key) or GFLV2_MODELS.get(key)
    if entry is None:
        raise KeyError(f"{name!r} is not in gfocal.model_io.model_zoo; available: {list_models()}")
    return key, entry


def _configs_root() -> str:
    root = os.environ.get("GFOCAL_CONFIGS") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..", "configs"
    )
    return os.path.normpath(root)


def _cache_root(cache_dir: Optional[str]) -> str:
    return os.path.expanduser(cache_dir or os.environ.get("GFOCAL_CACHE") or "~/.cache/gfocal")


def get_config_file(name: str) -> str:
    """Path of the config of a zoo model (``$GFOCAL_CONFIGS`` overrides the configs folder)."""
    _, entry = _lookup(name)
    path = os.path.join(_configs_root(), entry.config)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: config of {name!r} not found; set GFOCAL_CONFIGS to the repository's configs/"
        )
    return path


def _base_config(name: str) -> CfgNode:
    _, entry = _lookup(name)
    return load_config(get_config_file(name), entry.opts)


def _sha256_prefix_ok(path: str, filename: str) -> bool:
    """mmdetection names files ``..._<first 8 hex digits of the sha256>.pth``."""
    m = re.search(r"-([0-9a-f]{8})\.pth$", filename)
    if m is None:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest().startswith(m[1])


def get_checkpoint(
    name: str, cache_dir: Optional[str] = None, download: bool = True, allow_pickle: bool = False
) -> str:
    """Path of the converted detectron2 checkpoint of a zoo model, fetching and converting it
    the first time. ``allow_pickle``: read pickled objects from a file that has no published
    checksum (GFocalV2's; trusted files only); verified mmdetection files always may."""
    from .conversion import convert_mmdet_gfl_checkpoint

    key, entry = _lookup(name)
    root = _cache_root(cache_dir)
    converted = os.path.join(root, "converted", key.split("/", 1)[1] + ".pth")
    if os.path.isfile(converted):
        return converted
    original = os.path.join(root, "gfocalv2" if entry.manual_download else "mmdet", entry.filename)
    if entry.manual_download and not os.path.isfile(original):
        raise FileNotFoundError(
            f"the checkpoint of {key} is not in the cache. The GFocalV2 authors publish it only as "
            f"a Google Drive link (no file name, no checksum), which cannot be fetched "
            f"automatically. Open\n  {entry.url}\ndownload the file and put it at\n  {original}\n"
            "(or set GFOCAL_CACHE / cache_dir to the folder holding gfocalv2/<file>)"
        )
    if not os.path.isfile(original):
        error = "download=False"
        if download:
            os.makedirs(os.path.dirname(original), exist_ok=True)
            try:
                torch.hub.download_url_to_file(entry.url, original, progress=True)
            except Exception as e:  # no network, proxy, HTTP error: all end in the same advice
                error = f"{type(e).__name__}: {e}"
        if not os.path.isfile(original):
            raise FileNotFoundError(
                f"the checkpoint of {key} is not in the cache and could not be downloaded "
                f"({error}). Fetch\n  {entry.url}\nand put it at\n  {original}\n"
                "(or set GFOCAL_CACHE / cache_dir to the folder holding mmdet/<file>)"
            )
    if not entry.manual_download and not _sha256_prefix_ok(original, entry.filename):
        raise ValueError(
            f"{original}: its sha256 does not start with the digits in its name; it is not the "
            f"published file (incomplete download?). Delete it and fetch {entry.url} again."
        )
    os.makedirs(os.path.dirname(converted), exist_ok=True)
    partial = converted + ".partial"
    # A published file verified above may have its pickled metadata read; an unverified one not.
    trusted = allow_pickle or not entry.manual_download
    convert_mmdet_gfl_checkpoint(original, partial, _base_config(key), allow_pickle=trusted)
    os.replace(partial, converted)
    return converted


def get_config(name: str, trained: bool = True, cache_dir: Optional[str] = None) -> CfgNode:
    """The detectron2 config of a zoo model; with ``trained`` its MODEL.WEIGHTS is the converted
    checkpoint (fetched and converted if needed). Works with ``DefaultPredictor``."""
    cfg = _base_config(name)
    if trained:
        cfg.MODEL.WEIGHTS = get_checkpoint(name, cache_dir)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def get(name: str, trained: bool = True, device: Optional[str] = None, cache_dir: Optional[str] = None):
    """A zoo model in eval mode, with its converted COCO weights if ``trained``."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = get_config(name, trained, cache_dir)
    if device is not None:
        cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    if trained:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()
