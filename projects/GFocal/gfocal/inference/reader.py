"""Reading a whole image window by window.

TIFF / GeoTIFF go through rasterio: each window is read on its own, so memory follows the batch
of tiles, not the image (a 20k x 20k orthomosaic is never loaded whole), and the CRS and affine
transform come with it. PNG / JPEG have no windowed decoder in OpenCV or Pillow; they are decoded
whole (they are rarely large) with ``cv2.imread``.

Ground resolution: :meth:`WindowReader.resampled` gives a view of the image at another pixel
size, read window by window: rasterio's resampled window reads (``read(window=..., out_shape=...,
resampling=...)``, average when shrinking, bilinear when enlarging) for TIFF, so memory stays
flat; one ``cv2.resize`` of the decoded image (INTER_AREA / INTER_LINEAR) otherwise. The valid-data
mask (nodata value, alpha band, internal mask, PNG alpha) is resampled with the view, nearest
neighbour (GDAL's ``dataset_mask`` read at ``out_shape``; ``cv2.INTER_NEAREST`` in memory), so the
nodata skip of :mod:`.nodata` works on resampled reads too.
:func:`image_gsd` reads a GeoTIFF's metres per pixel from its transform and CRS units, and
:func:`resample_scale` turns it and the model's ``INPUT.GSD`` into the resampling factor.
"""
import glob
import math
import logging
import os
import warnings
from typing import Optional

import numpy as np

from ..data.formats import IMAGE_EXTENSIONS  # the project's one list of image extensions

__all__ = [
    "IMAGE_EXTENSIONS",
    "expand_image_inputs",
    "ImageReadError",
    "WindowReader",
    "image_gsd",
    "open_image",
    "resample_scale",
]

logger = logging.getLogger(__name__)

RASTERIO_EXTENSIONS = (".tif", ".tiff")  # read window by window; the others decoded whole


class ImageReadError(ValueError):
    """An image that cannot be read (missing, corrupt, unsupported bands or dtype)."""


class WindowReader:
    """One image: ``height``, ``width``, ``read(x0, y0, x1, y1)`` -> (h, w, 3) uint8 RGB, and for
    geo-referenced input ``crs`` (a rasterio CRS) and ``transform`` (pixel -> map affine).
    ``has_mask``: the image declares where it holds no data (a nodata value, an alpha band or an
    internal mask), read by ``read_mask``."""

    path: str
    height: int
    width: int
    crs = None
    transform = None
    dtype = "uint8"  # the type of the bands in the file
    has_mask = False

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def read_mask(self, x0: int, y0: int, x1: int, y1: int) -> Optional[np.ndarray]:
        """(h, w) bool, True where the window holds data; None when ``has_mask`` is False."""
        return None

    def resampled(self, height: int, width: int) -> "WindowReader":
        """This image seen at ``height`` x ``width`` pixels (windows in those pixels). The
        default decodes the image once and resizes it whole (in-memory readers)."""
        import cv2

        rgb = self.read(0, 0, self.width, self.height)
        shrink = height * width < self.height * self.width
        resized = cv2.resize(np.ascontiguousarray(rgb), (width, height),
                             interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        mask = self.read_mask(0, 0, self.width, self.height) if self.has_mask else None
        if mask is not None:
            mask = cv2.resize(mask.astype(np.uint8), (width, height),
                              interpolation=cv2.INTER_NEAREST) > 0
        return _ArrayView(resized, self.path, mask, self.dtype)

    def close(self) -> None:
        pass

    def __enter__(self) -> "WindowReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ArrayView(WindowReader):
    def __init__(self, rgb: np.ndarray, path: str, mask: Optional[np.ndarray] = None,
                 dtype: str = "uint8"):
        self.path, self._rgb, self._mask, self.dtype = path, rgb, mask, dtype
        self.height, self.width = rgb.shape[:2]
        self.has_mask = mask is not None

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._rgb[y0:y1, x0:x1]

    def read_mask(self, x0: int, y0: int, x1: int, y1: int) -> Optional[np.ndarray]:
        return None if self._mask is None else self._mask[y0:y1, x0:x1]


class _Cv2Reader(WindowReader):
    def __init__(self, path: str):
        import cv2

        self.path = path
        self._alpha = None
        image = _decode_png_with_alpha(path) if _png_has_alpha(path) else None
        if image is not None:
            image, self._alpha = image[:, :, :3], image[:, :, 3] > 0
            self.has_mask = True
        else:
            image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise ImageReadError(f"{path}: cannot be decoded as an image (corrupt or not an image)")
        self._rgb = np.ascontiguousarray(image[:, :, ::-1])
        self.height, self.width = self._rgb.shape[:2]

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._rgb[y0:y1, x0:x1]

    def read_mask(self, x0: int, y0: int, x1: int, y1: int) -> Optional[np.ndarray]:
        return None if self._alpha is None else self._alpha[y0:y1, x0:x1]


def _png_has_alpha(path: str) -> bool:
    """The PNG header's colour type (byte 25) is grey + alpha (4) or RGBA (6)."""
    with open(path, "rb") as f:
        head = f.read(26)
    return len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[25] in (4, 6)


def _decode_png_with_alpha(path: str) -> Optional[np.ndarray]:
    """(H, W, 4) uint8 BGRA of a PNG with an alpha channel (16-bit scaled to 8 as OpenCV's
    IMREAD_COLOR does), or None when it does not decode to four channels."""
    import cv2

    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim != 3 or image.shape[2] != 4:
        return None
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    return image if image.dtype == np.uint8 else None


class _RasterioReader(WindowReader):
    def __init__(self, path: str, cache_mb: int):
        import rasterio
        from rasterio.enums import MaskFlags
        from rasterio.errors import RasterioIOError

        self.path = path
        # GDAL's block cache defaults to 5% of RAM and keeps every block read until full: capped
        # here, since tiles are read row by row and only the overlap with the next row is re-read.
        self._env = rasterio.Env(GDAL_CACHEMAX=int(cache_mb))
        self._env.__enter__()
        try:
            self._src = rasterio.open(path)
        except RasterioIOError as e:
            self._env.__exit__(None, None, None)
            raise ImageReadError(f"{path}: cannot be read by rasterio ({e})") from e
        src = self._src
        self.height, self.width = src.height, src.width
        if src.count not in (1, 3, 4):
            self.close()
            raise ImageReadError(
                f"{path}: has {src.count} bands; expected 3 (RGB), 4 (RGBA) or 1 (grey)"
            )
        if src.dtypes[0] != "uint8":
            self.close()
            raise ImageReadError(
                f"{path}: band type {src.dtypes[0]}; the model takes 8-bit images "
                "(rescale to uint8 first, e.g. gdal_translate -ot Byte -scale)"
            )
        self._bands = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
        self.dtype = src.dtypes[0]
        # GDAL's mask flags: all_valid unless a nodata value, an alpha band or a mask is declared.
        self.has_mask = any(MaskFlags.all_valid not in src.mask_flag_enums[b - 1] for b in set(self._bands))
        if src.crs is not None:
            self.crs, self.transform = src.crs, src.transform
        elif not src.transform.is_identity:
            self.transform = src.transform
        if self.crs is None:
            warnings.warn(
                f"{path}: no CRS (not geo-referenced): outputs are in pixel coordinates, "
                "no GeoJSON is written",
                stacklevel=3,
            )

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window

        try:
            bands = self._src.read(self._bands, window=Window(x0, y0, x1 - x0, y1 - y0))
        except RasterioIOError as e:  # a truncated or damaged file fails on the damaged block
            raise ImageReadError(f"{self.path}: window {(x0, y0, x1, y1)} cannot be read ({e})") from e
        return np.ascontiguousarray(bands.transpose(1, 2, 0))

    def read_mask(self, x0: int, y0: int, x1: int, y1: int) -> Optional[np.ndarray]:
        """GDAL's dataset mask of the window (alpha band, internal / .msk mask, or: some band
        differs from the nodata value); only the mask is read."""
        if not self.has_mask:
            return None
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window

        try:
            mask = self._src.dataset_mask(window=Window(x0, y0, x1 - x0, y1 - y0))
        except RasterioIOError as e:
            raise ImageReadError(f"{self.path}: mask of window {(x0, y0, x1, y1)} cannot be read ({e})") from e
        return mask > 0

    def resampled(self, height: int, width: int) -> WindowReader:
        return _RasterioResampled(self, height, width)

    def read_resampled(self, window, out_hw) -> np.ndarray:
        """Source window (x0, y0, x1, y1) in (fractional) source pixels, read at ``out_hw``."""
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window

        x0, y0, x1, y1 = window
        out_h, out_w = out_hw
        shrink = out_h * out_w < (y1 - y0) * (x1 - x0)
        try:
            bands = self._src.read(
                self._bands, window=Window(x0, y0, x1 - x0, y1 - y0),
                out_shape=(len(self._bands), out_h, out_w),
                resampling=Resampling.average if shrink else Resampling.bilinear,
            )
        except RasterioIOError as e:
            raise ImageReadError(f"{self.path}: window {tuple(window)} cannot be read ({e})") from e
        return np.ascontiguousarray(bands.transpose(1, 2, 0))

    def read_mask_resampled(self, window, out_hw) -> Optional[np.ndarray]:
        """GDAL's dataset mask of the source window (x0, y0, x1, y1) (fractional source pixels)
        read at ``out_hw``, nearest neighbour (a mask has no in-between values); None when the
        image declares no mask."""
        if not self.has_mask:
            return None
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window

        x0, y0, x1, y1 = window
        try:
            mask = self._src.dataset_mask(window=Window(x0, y0, x1 - x0, y1 - y0),
                                          out_shape=tuple(out_hw), resampling=Resampling.nearest)
        except RasterioIOError as e:
            raise ImageReadError(f"{self.path}: mask of window {tuple(window)} cannot be read ({e})") from e
        return mask > 0

    def close(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None
            self._env.__exit__(None, None, None)


class _RasterioResampled(WindowReader):
    """A rasterio image at another pixel size: each window a resampled window read."""

    def __init__(self, source: _RasterioReader, height: int, width: int):
        self.source, self.path = source, source.path
        self.height, self.width = int(height), int(width)
        self.dtype, self.has_mask = source.dtype, source.has_mask
        self._fx, self._fy = source.width / self.width, source.height / self.height

    def _source_window(self, x0: int, y0: int, x1: int, y1: int):
        return (x0 * self._fx, y0 * self._fy, x1 * self._fx, y1 * self._fy)

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self.source.read_resampled(self._source_window(x0, y0, x1, y1), (y1 - y0, x1 - x0))

    def read_mask(self, x0: int, y0: int, x1: int, y1: int) -> Optional[np.ndarray]:
        """The source's valid-data mask at this view's pixels (nearest neighbour)."""
        return self.source.read_mask_resampled(self._source_window(x0, y0, x1, y1),
                                               (y1 - y0, x1 - x0))


def image_gsd(reader: WindowReader) -> Optional[float]:
    """Metres per pixel of a geo-referenced image (the mean of the transform's pixel width and
    height, in the CRS's linear unit converted to metres), or None without a CRS. A geographic
    CRS (degrees) raises: its pixels have no metric size."""
    crs, transform = reader.crs, reader.transform
    if crs is None or transform is None:
        return None
    if crs.is_geographic:
        raise ImageReadError(
            f"{reader.path}: its CRS {crs.to_string()} is geographic (degrees), so its pixels have "
            "no size in metres for the model's INPUT.GSD; reproject it to a metric CRS first, e.g. "
            "gdalwarp -t_srs EPSG:32612 in.tif out.tif (the UTM zone of the area), or give --gsd"
        )
    unit, factor = crs.linear_units_factor
    size = math.sqrt(abs(transform.a * transform.e - transform.b * transform.d)) * factor
    logger.info("%s: %.4g m per pixel (transform, CRS unit %s)", reader.path, size, unit)
    return size


def resample_scale(
    reader: WindowReader, model_gsd: float, gsd: Optional[float] = None
) -> float:
    """Factor by which to resize ``reader``'s image to the model's ground resolution
    (``image GSD / INPUT.GSD``; 1.0 when either is unknown). ``gsd`` (``--gsd``, metres per
    pixel) replaces the GeoTIFF's; refused when <= 0, or when the model's GSD is unknown."""
    if model_gsd < 0:
        raise ValueError(f"INPUT.GSD={model_gsd} must be > 0 (metres per pixel), or 0 for unknown")
    if gsd is not None:
        if not gsd > 0:
            raise ValueError(f"--gsd {gsd} must be > 0 (metres per pixel of the input image)")
        if model_gsd == 0:
            raise ValueError(
                f"--gsd {gsd}: the model's ground resolution INPUT.GSD is 0 (unknown), so there "
                "is nothing to resample to; set INPUT.GSD to the metres per pixel it was trained at"
            )
    if model_gsd == 0:
        return 1.0
    source = gsd if gsd is not None else image_gsd(reader)
    if source is None:
        return 1.0
    return source / model_gsd


def open_image(path: str, cache_mb: int = 256) -> WindowReader:
    """A :class:`WindowReader` for ``path`` (rasterio for TIFF, with GDAL's block cache capped at
    ``cache_mb``; OpenCV otherwise); raises :class:`ImageReadError` naming the file when it is
    missing or cannot be decoded."""
    if not os.path.isfile(path):
        raise ImageReadError(f"{path}: no such file")
    if path.lower().endswith(RASTERIO_EXTENSIONS):
        return _RasterioReader(path, cache_mb)
    return _Cv2Reader(path)


def expand_image_inputs(items, flag: str = "input") -> list:
    """Image files of ``items`` (files, and folders: their images by name, ``IMAGE_EXTENSIONS``);
    a missing item or a folder without images is a ValueError naming it."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(item, "*"))
                           if p.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise ValueError(f"{flag} folder {item} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise ValueError(f"{flag} {item}: no such file or folder")
    return paths
