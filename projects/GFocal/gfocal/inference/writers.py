"""Writing the detections of whole images: CSV (deepforest's columns plus ``score``), COCO
results JSON, GeoJSON in the image's CRS and a downscaled drawing.

Every file is written to ``<name>.tmp`` in the same folder and renamed into place when complete
(``os.replace`` is atomic on POSIX), so a run stopped half-way never leaves a complete-looking file.
"""
import contextlib
import csv
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

__all__ = [
    "CSV_COLUMNS",
    "atomic_open",
    "map_boxes",
    "write_coco_results",
    "write_csv",
    "write_drawing",
    "write_geojson",
]

CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label", "score")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator:
    """Open ``path + '.tmp'`` for writing; on success rename it to ``path``, on error remove it."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_csv(path: str, rows: Sequence[dict]) -> None:
    """One row per box: image_path, xmin, ymin, xmax, ymax (pixels), label (class name), score."""
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


def write_coco_results(path: str, results: List[dict]) -> None:
    """COCO detection results: ``image_id``, ``category_id``, ``bbox`` (XYWH pixels), ``score``."""
    with atomic_open(path) as f:
        json.dump(results, f)


def map_boxes(boxes: np.ndarray, transform) -> np.ndarray:
    """(N, 4) pixel XYXY -> (N, 4, 2) map coordinates of the four corners (an affine transform
    with rotation maps a pixel rectangle to a parallelogram), in the order top-left, top-right,
    bottom-right, bottom-left of the pixel box."""
    x0, y0, x1, y1 = boxes.T
    corners = np.stack([np.stack([x0, y0], 1), np.stack([x1, y0], 1),
                        np.stack([x1, y1], 1), np.stack([x0, y1], 1)], 1)  # (N, 4, 2) pixels
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    mx = a * corners[..., 0] + b * corners[..., 1] + c
    my = d * corners[..., 0] + e * corners[..., 1] + f
    return np.stack([mx, my], -1)


def write_geojson(path: str, rows: Sequence[dict], boxes: np.ndarray, crs, transform) -> None:
    """A GeoJSON FeatureCollection of the boxes as polygons in the image's CRS (``crs`` member
    with the CRS's authority name, e.g. EPSG:32612; RFC 7946 readers assume WGS 84 without it),
    properties as the CSV columns."""
    features = []
    for row, ring in zip(rows, map_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), transform)):
        coords = ring.tolist() + [ring[0].tolist()]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [coords]},
            "properties": {k: row[k] for k in ("image_path", "label", "score")},
        })
    authority = crs.to_authority() if crs is not None else None
    name = ":".join(authority) if authority else (crs.to_wkt() if crs is not None else None)
    collection: Dict = {"type": "FeatureCollection", "features": features}
    if name:
        collection["crs"] = {"type": "name", "properties": {"name": name}}
    with atomic_open(path) as f:
        json.dump(collection, f)


def write_drawing(path: str, reader, boxes: np.ndarray, scores: np.ndarray, max_side: int = 2048,
                  score_thresh: float = 0.0) -> float:
    """Draw the boxes (score >= ``score_thresh``) on the whole image, downscaled so that its
    longer side is at most ``max_side``; the image is read in blocks of ``chunk`` x ``chunk``
    pixels, each downscaled on its own, so a huge image is never held at full size.
    Returns the scale."""
    import cv2

    chunk = 1024
    scale = min(1.0, max_side / max(reader.height, reader.width))
    out_w, out_h = max(1, round(reader.width * scale)), max(1, round(reader.height * scale))
    canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)
    for y0 in range(0, reader.height, chunk):
        y1 = min(reader.height, y0 + chunk)
        oy0, oy1 = round(y0 * scale), round(y1 * scale)
        for x0 in range(0, reader.width, chunk):
            x1 = min(reader.width, x0 + chunk)
            ox0, ox1 = round(x0 * scale), round(x1 * scale)
            if oy1 > oy0 and ox1 > ox0:
                canvas[oy0:oy1, ox0:ox1] = cv2.resize(
                    np.ascontiguousarray(reader.read(x0, y0, x1, y1)), (ox1 - ox0, oy1 - oy0),
                    interpolation=cv2.INTER_AREA,
                )
    canvas = np.ascontiguousarray(canvas[:, :, ::-1])  # RGB -> BGR for OpenCV
    thickness = max(1, round(2 * scale)) if scale < 1 else 2
    for (x0, y0, x1, y1), s in zip(np.asarray(boxes).reshape(-1, 4) * scale, scores):
        if s >= score_thresh:
            cv2.rectangle(canvas, (int(x0), int(y0)), (int(x1), int(y1)), (0, 0, 255), thickness)
    ok, data = cv2.imencode(os.path.splitext(path)[1] or ".png", canvas)
    if not ok:
        raise OSError(f"cannot encode drawing {path}")
    with atomic_open(path, "wb") as f:
        f.write(data.tobytes())
    return scale
