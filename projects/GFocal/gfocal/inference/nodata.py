"""Nodata and transparency in whole images: which tiles to skip, which boxes to drop.

Orthomosaics carry a border, often large, where the mosaic holds no data: a nodata value, an alpha
band or an internal mask in a GeoTIFF, an alpha channel in a PNG. GDAL turns each into one dataset
mask (``rasterio``'s ``dataset_mask``), read here window by window through
:meth:`.reader.WindowReader.read_mask`. A tile whose window holds no valid pixel is not run;
a box whose centre lies on an invalid pixel is dropped. ``--nodata VALUE`` declares, in addition,
that pixels whose three bands all equal VALUE hold no data (black or white borders with no tag);
that test reads the window's pixels.
"""
import math
import os
import warnings
from typing import Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch import Tensor

from .reader import ImageReadError, WindowReader

__all__ = ["NodataFilter", "box_centres_valid", "check_image_nodata", "check_nodata_value"]


def _dtype_range(dtype: str) -> Tuple[float, float]:
    np_dtype = np.dtype(dtype)
    info = np.iinfo(np_dtype) if np.issubdtype(np_dtype, np.integer) else np.finfo(np_dtype)
    return float(info.min), float(info.max)


def _outside(value: float, dtype: str) -> Optional[str]:
    """Why ``value`` cannot be a pixel of type ``dtype`` (None when it can)."""
    low, high = _dtype_range(dtype)
    if np.issubdtype(np.dtype(dtype), np.integer):
        if not math.isfinite(value) or value != int(value):
            return f"not an integer, as the band type {dtype} needs"
        if not low <= value <= high:
            return f"outside the range of the band type {dtype} [{low:.0f}, {high:.0f}]"
    elif math.isfinite(value) and not low <= value <= high:
        return f"outside the range of the band type {dtype}"
    return None


def check_nodata_value(value: Optional[float], dtype: str = "uint8", path: Optional[str] = None) -> None:
    """Refuse a ``--nodata`` value that no pixel of type ``dtype`` can take (ValueError naming
    the flag, and the file when given)."""
    if value is None:
        return
    why = _outside(float(value), dtype)
    if why:
        where = f" (the bands of {path})" if path else ""
        raise ValueError(f"--nodata {value:g} is {why}{where}: no pixel could match it")


def _tiff_nodata_tag(path: str) -> Optional[str]:
    """The raw GDAL_NODATA TIFF tag (42113) of ``path``: rasterio reports a value outside the band
    type as no nodata at all, and GDAL's mask ignores it; the header alone is read."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # only the header is read: no decompression bomb
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                tag = getattr(im, "tag_v2", {}).get(42113)
    except Exception:  # not a TIFF Pillow can parse (e.g. some BigTIFF): nothing to report
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return None if tag is None else str(tag).strip("\x00 ")


def check_image_nodata(reader: WindowReader, nodata: Optional[float] = None) -> None:
    """Refuse ``--nodata`` outside the band type of ``reader`` (ValueError naming the flag and the
    file), and, without ``--nodata``, a TIFF whose own nodata tag lies outside its band type
    (ImageReadError naming the file: GDAL ignores such a tag, so its border would be predicted)."""
    check_nodata_value(nodata, reader.dtype, reader.path)
    if nodata is not None or reader.has_mask or not reader.path.lower().endswith((".tif", ".tiff")):
        return
    tag = _tiff_nodata_tag(reader.path) if os.path.isfile(reader.path) else None
    if tag is None:
        return
    try:
        why = _outside(float(tag), reader.dtype)
    except ValueError:
        why = "not a number"
    if why:
        raise ImageReadError(
            f"{reader.path}: its nodata value {tag} is {why}, so GDAL ignores it and no pixel counts "
            f"as nodata: fix the tag (gdal_edit.py -a_nodata VALUE or -unsetnodata) or pass --nodata VALUE"
        )


def box_centres_valid(boxes: Tensor, mask: np.ndarray) -> Tensor:
    """(N,) bool: the centre of each (N, 4) XYXY box (pixels of the mask's window) is on a valid
    pixel of the (h, w) bool ``mask``."""
    h, w = mask.shape
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2).floor().long().cpu()
    x = centres[:, 0].clamp(0, w - 1)
    y = centres[:, 1].clamp(0, h - 1)
    return torch.from_numpy(np.ascontiguousarray(mask))[y, x].to(boxes.device)


class NodataFilter:
    """The valid-data mask of one image, tile by tile: :meth:`select` reads the mask of each
    window once and keeps the tiles with some data; :meth:`keep_boxes` re-reads the mask of the
    tiles that are part data, part nodata (the only ones where a box can fall on nodata)."""

    def __init__(self, reader: WindowReader, nodata: Optional[float] = None):
        check_nodata_value(nodata, reader.dtype, reader.path)
        self.reader, self.nodata = reader, nodata
        self.active = reader.has_mask or nodata is not None

    def window_mask(self, window: Sequence[int]) -> Optional[np.ndarray]:
        """(h, w) bool, True where the window holds data (None: the whole image does)."""
        if not self.active:
            return None
        x0, y0, x1, y1 = (int(v) for v in window)
        mask = self.reader.read_mask(x0, y0, x1, y1)
        if self.nodata is not None:
            by_value = (self.reader.read(x0, y0, x1, y1) != self.nodata).any(-1)
            mask = by_value if mask is None else mask & by_value
        return mask

    def select(self, grid: np.ndarray, ids: np.ndarray) -> Tuple[np.ndarray, Set[int]]:
        """Of the tiles ``ids`` of ``grid``: those holding some data (in order) and the set of
        those that also hold nodata."""
        if not self.active:
            return ids, set()
        run, partial = [], set()
        for i in ids.tolist():
            mask = self.window_mask(grid[i])
            if mask.any():
                run.append(i)
                if not mask.all():
                    partial.add(i)
        return np.asarray(run, dtype=np.int64), partial

    def keep_boxes(self, window: Sequence[int], boxes: Tensor) -> Tensor:
        """(N,) bool: boxes (XYXY in the pixels of ``window``) whose centre holds data."""
        mask = self.window_mask(window)
        if mask is None or len(boxes) == 0:
            return torch.ones(len(boxes), dtype=torch.bool)
        return box_centres_valid(boxes, mask)
