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
    "PredictionRecords",
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


class PredictionRecords:
    """The results of a prediction run, image by image: the CSV rows, COCO results and images,
    and each image's GeoJSON (geo-referenced input) and drawing written as it comes; the run's
    files written by :meth:`write` (``detections.csv`` last: it marks a complete run)."""

    def __init__(self, output: str, class_names: Sequence[str], paths: Sequence[str],
                 draw_max_side: int = 2048, draw_score_thresh: float = 0.3):
        self.output, self.names = output, list(class_names)
        self.ids = {path: i for i, path in enumerate(paths, start=1)}
        self.draw_max_side, self.draw_score_thresh = draw_max_side, draw_score_thresh
        self.rows: List[dict] = []
        self.coco: List[dict] = []
        self.images: List[dict] = []

    def add(self, path: str, reader, instances) -> int:
        """Record one image's detections (an ``Instances`` in image pixels); their number."""
        stem = os.path.splitext(os.path.basename(path))[0]
        boxes = instances.pred_boxes.tensor.numpy().astype(np.float64)
        scores = instances.scores.numpy().astype(np.float64)
        classes = instances.pred_classes.numpy()
        rows = [{"image_path": os.path.basename(path), "xmin": round(b[0], 2), "ymin": round(b[1], 2),
                 "xmax": round(b[2], 2), "ymax": round(b[3], 2), "label": self.names[c],
                 "score": round(float(s), 4)} for b, s, c in zip(boxes.tolist(), scores, classes)]
        if reader.georeferenced:
            write_geojson(os.path.join(self.output, stem + ".geojson"), rows, boxes, reader.crs,
                          reader.transform)
        write_drawing(os.path.join(self.output, stem + "_drawing.png"), reader, boxes, scores,
                      self.draw_max_side, self.draw_score_thresh)
        image_id = self.ids[path]
        self.rows += rows
        self.coco += [{"image_id": image_id, "category_id": int(c) + 1,
                       "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
                      for b, s, c in zip(boxes.tolist(), scores, classes)]
        self.images.append({"id": image_id, "file_name": path, "height": reader.height,
                            "width": reader.width})
        return len(rows)

    def write(self, skipped: Optional[Sequence[tuple]] = None) -> None:
        """COCO results and images, ``skipped_inputs.csv`` (when ``skipped`` is given), then the
        CSV of detections."""
        write_coco_results(os.path.join(self.output, "coco_results.json"), self.coco)
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(self.names)]
        with atomic_open(os.path.join(self.output, "coco_images.json")) as f:
            json.dump({"images": self.images, "categories": categories}, f)
        if skipped is not None:
            with atomic_open(os.path.join(self.output, "skipped_inputs.csv"), newline="") as f:
                csv.writer(f).writerows([("path", "error")] + list(skipped))
        write_csv(os.path.join(self.output, "detections.csv"), self.rows)
