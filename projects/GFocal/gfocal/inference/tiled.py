"""Tiled prediction of whole images: several tiles per forward pass, one merge per image."""
import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from detectron2.config import configurable
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from ..model_io.weights import load_evaluated_weights
from ..modeling.inference_thresholds import inference_thresholds
from ..tiling import check_tiling, tile_windows
from .backends import build_backend, has_dense_parts, runtime_package
from .forward import PRECISIONS, prepare_model
from .merge import merge_detections
from .nodata import NodataFilter, check_nodata_value
from .reader import WindowReader, open_image, resample_scale
from .test_time_augmentation import TestTimeAugmentation
from .tile_detections import TileDetections

__all__ = ["TiledPredictor", "TiledResult", "ArrayReader", "PRECISIONS", "DEVICE_DEFAULTS",
           "TILE_MAX_DETS"]

logger = logging.getLogger(__name__)

# Detections kept per tile before the merge. A whole image's tiles hold many more objects than
# one test image of the training set (TEST.DETECTIONS_PER_IMAGE, 100 for COCO): a 400 px tile of
# dense canopy holds a few hundred crowns. mmdetection's and detectron2's candidate count per
# level (TOPK_CANDIDATES_TEST) is 1000.
TILE_MAX_DETS = 1000

# The defaults of backend, batch size, precision and memory format per device type (None
# arguments), chosen from ``benchmarks/tiled_predict.py --sections sweep`` (docs/whole_images.md).
# CPU: OpenVINO runs backbone and head about 2x faster than eager fp32, with the same boxes; one
# tile per forward (batching 8 tiles was slower on a 2-core CPU); bf16 gained nothing on a CPU
# without AMX. ``channels_last`` applies to the torch backend (the fallback when OpenVINO is not
# installed: 1.35-1.46x faster than NCHW on CPU).
DEVICE_DEFAULTS = {
    "cpu": {"backend": "openvino", "batch_size": 1, "precision": "fp32", "channels_last": True},
    "cuda": {"backend": "torch", "batch_size": 8, "precision": "bf16", "channels_last": True},
}


def _default_backend(name: str, model: torch.nn.Module) -> str:
    """``name``, or ``torch``: for a model that is not a backbone + head detector, or (with a
    warning) when the package of ``name`` is not installed."""
    if name == "torch" or not has_dense_parts(model):
        return "torch"
    try:
        runtime_package(name)
    except ImportError as e:
        logger.warning("%s; running --backend torch", e)
        return "torch"
    return name


class ArrayReader(WindowReader):
    """A :class:`WindowReader` over an image already in memory, (H, W, 3) uint8 RGB."""

    def __init__(self, rgb: np.ndarray, path: str = "<array>"):
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"{path}: expected an (H, W, 3) uint8 RGB image, got "
                             f"{rgb.dtype} {rgb.shape}")
        self.path, self._rgb = path, rgb
        self.height, self.width = rgb.shape[:2]

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._rgb[y0:y1, x0:x1]


@dataclass
class TiledResult:
    """Detections of one whole image (``instances`` in its pixel coordinates, best first)."""

    instances: Instances
    num_tiles: int
    capped: bool  # the --max-dets cap dropped detections
    tiles_at_cap: int  # tiles whose detections above the score threshold exceeded the per-tile cap
    num_skipped: int = 0  # tiles not run: no valid pixel (nodata / alpha / mask)


class TiledPredictor:
    """Run a dense detector on a whole image cut into overlapping square patches.

    Patches are read window by window (:mod:`.reader`), fed ``batch_size`` at a time at the
    image's own pixel scale (no test-time resize: an aerial model is trained at one ground
    resolution), and their detections merged across seams by :func:`.merge.merge_detections`
    (the seam rule, then class-wise NMS at the model's ``test_nms_thresh``, then ``max_dets``).

    The model runs through the one forward path of :mod:`.forward` (``backend="torch"``:
    ``precision="bf16"`` autocasts backbone and head, decoding, NMS and the merge stay float32;
    ``channels_last`` stores weights NHWC); ``"onnxruntime"`` and ``"openvino"`` run its backbone
    and head in that runtime (:mod:`.backends`). ``backend``, ``batch_size``, ``precision`` and
    ``channels_last`` left None take the device type's :data:`DEVICE_DEFAULTS`.
    """

    @configurable
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        input_format: str,
        patch_size: int,
        overlap: int,
        batch_size: Optional[int] = None,
        max_dets: int = 10000,
        score_thresh: Optional[float] = None,
        precision: Optional[str] = None,
        channels_last: Optional[bool] = None,
        edge_margin: float = 2.0,
        tile_max_dets: int = TILE_MAX_DETS,
        backend: Optional[str] = None,
        skip_nodata: bool = True,
        nodata: Optional[float] = None,
        model_gsd: float = 0.0,
        resample: bool = True,
        tta: Optional[TestTimeAugmentation] = None,
    ):
        """
        Args:
            model: a detectron2 dense detector (``GFL``) with its weights loaded.
            input_format: "RGB" or "BGR", the channel order the model takes.
            patch_size, overlap: the tiling grid in pixels (:func:`.grid.tile_windows`).
            batch_size: tiles per forward pass (None: the device's default).
            max_dets: detections kept per whole image after the merge.
            score_thresh: the model's ``test_score_thresh`` (None keeps the config's).
            precision: "fp32" or "bf16" (autocast of backbone and head; None: device default).
            channels_last: NHWC weights and input (None: the device's default).
            edge_margin: pixels within which a box "touches" a tile edge (seam rule; < 0: off).
            tile_max_dets: detections kept per tile before the merge (the model's
                ``max_detections_per_image`` while the predictor runs it).
            backend: "torch", "onnxruntime" or "openvino" (:mod:`.backends`; None: the device's
                default, torch when that is not installed).
            skip_nodata: skip tiles with no valid pixel and drop boxes centred on nodata
                (:mod:`.nodata`: the image's nodata value, alpha band or mask).
            nodata: a pixel value (all bands) that also means "no data" (``--nodata``).
            model_gsd: metres per pixel the model was trained at (``INPUT.GSD``; 0: unknown).
            resample: read each image resampled to ``model_gsd`` when its own GSD is known (a
                GeoTIFF's transform, or ``gsd`` of :meth:`__call__`); boxes are mapped back.
            tta: test-time augmentation of each tile (``TEST.AUG``: its sizes and symmetries run
                through the backend, merged per tile before the seam merge), or None.
        """
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT={input_format!r}: the tiled predictor takes RGB or BGR")
        device = getattr(model, "device", torch.device("cpu"))
        defaults = DEVICE_DEFAULTS.get(getattr(device, "type", "cpu"), DEVICE_DEFAULTS["cpu"])
        if backend is None:  # NHWC asked for is a torch option: it selects the torch backend
            backend = "torch" if channels_last else _default_backend(defaults["backend"], model)
        if backend != "torch":  # a runtime picks its own memory layout
            defaults = {**defaults, "precision": "fp32", "channels_last": False}
        batch_size = defaults["batch_size"] if batch_size is None else batch_size
        precision = defaults["precision"] if precision is None else precision
        channels_last = defaults["channels_last"] if channels_last is None else channels_last
        if precision not in PRECISIONS:
            raise ValueError(f"--precision {precision!r} must be one of {PRECISIONS}")
        if batch_size < 1:
            raise ValueError(f"--batch-size {batch_size} must be >= 1")
        if max_dets < 1:
            raise ValueError(f"--max-dets {max_dets} must be >= 1")
        if tile_max_dets < 1:
            raise ValueError(f"--tile-max-dets {tile_max_dets} must be >= 1")
        if score_thresh is not None and not 0.0 <= score_thresh <= 1.0:
            raise ValueError(f"--score-thresh {score_thresh} must be in [0, 1]")
        strides = getattr(model, "strides", None) or [32]
        check_tiling(patch_size, overlap, max(strides))
        self.model = model.eval()
        self.input_format = input_format
        self.patch_size, self.overlap = int(patch_size), int(overlap)
        self.batch_size, self.max_dets = int(batch_size), int(max_dets)
        self.tile_max_dets = int(tile_max_dets)
        # The model's thresholds while this predictor runs it (its own API, restored after):
        # one more than the per-tile cap, so that a tile that reaches it is known to be cut.
        self._thresholds = {"max_detections": self.tile_max_dets + 1}
        if score_thresh is not None:
            self._thresholds["score_thresh"] = float(score_thresh)
        self.precision, self.channels_last = precision, bool(channels_last)
        self.edge_margin = float(edge_margin)
        if not model_gsd >= 0:
            raise ValueError(f"INPUT.GSD={model_gsd} must be > 0 (metres per pixel), or 0 for unknown")
        self.model_gsd, self.resample = float(model_gsd), bool(resample)
        self.skip_nodata, self.nodata = bool(skip_nodata), nodata
        if nodata is not None and not skip_nodata:
            raise ValueError("--nodata needs the nodata skip (drop --no-skip-nodata)")
        check_nodata_value(nodata)
        self.backend_name = backend
        self._backend = None
        self.tta = None
        if tta is not None:  # a tile's merged versions obey the per-tile cap as the model's do
            self.tta = copy.copy(tta)
            self.tta.max_detections, self.tta.batch_size = self.tile_max_dets + 1, self.batch_size
        if hasattr(model, "test_score_thresh"):  # a detector (tests give stand-ins)
            prepare_model(self.model, self.channels_last)
            with self._model_thresholds():
                self._backend = build_backend(backend, self.model, precision, self.channels_last)

    @classmethod
    def from_config(cls, cfg, weights: Optional[str] = None, **kwargs):
        """Build the model of a yacs config with its evaluated weights (``MODEL.WEIGHTS`` or
        ``weights``: :func:`gfocal.model_io.weights.load_evaluated_weights`); the patch size
        defaults to the config's test size ``INPUT.MIN_SIZE_TEST``, the overlap to a quarter of
        the patch; ``tta=True`` adds the config's test-time augmentation (``TEST.AUG``, whether
        or not ``TEST.AUG.ENABLED``). Other keyword arguments are passed through."""
        model = build_model(cfg)
        load_evaluated_weights(cfg, model, weights or cfg.MODEL.WEIGHTS)
        patch = kwargs.pop("patch_size", None) or int(cfg.INPUT.MIN_SIZE_TEST)
        overlap = kwargs.pop("overlap", None)
        tta = kwargs.pop("tta", None)
        return {
            "model": model,
            "tta": TestTimeAugmentation(cfg, model) if tta else None,
            "input_format": cfg.INPUT.FORMAT,
            "patch_size": patch,
            "overlap": patch // 4 if overlap is None else overlap,
            "model_gsd": float(cfg.INPUT.get("GSD", 0.0)),
            **{k: v for k, v in kwargs.items() if v is not None},
        }

    # ------------------------------------------------------------------------------------------
    @property
    def score_thresh(self) -> float:
        """The score threshold the model runs with in this predictor."""
        return self._thresholds.get("score_thresh", self.model.test_score_thresh)

    def _model_thresholds(self):
        return inference_thresholds(self.model, **self._thresholds)

    def _tile_inputs(self, tiles: Sequence[np.ndarray]) -> List[dict]:
        # With TTA the tiles stay uint8, as the evaluation's inputs: detectron2 resizes a uint8
        # image with PIL and a float one with torch, which differ.
        dtype = None if self.tta is not None else torch.float32
        inputs = []
        for tile in tiles:
            if self.input_format == "BGR":
                tile = tile[:, :, ::-1]
            image = torch.as_tensor(np.ascontiguousarray(tile.transpose(2, 0, 1)), dtype=dtype)
            inputs.append({"image": image, "height": tile.shape[0], "width": tile.shape[1]})
        return inputs

    def run_tiles(self, tiles: Sequence[np.ndarray]) -> Tuple[List[Instances], List[bool]]:
        """One forward pass over a batch of (h, w, 3) uint8 RGB tiles: per tile its
        :class:`Instances` in tile pixels (the model's NMS, at most ``tile_max_dets``), and
        whether the cap cut detections that passed the score threshold."""
        with self._model_thresholds():
            inputs = self._tile_inputs(tiles)
            found = self.tta(self._backend, inputs) if self.tta is not None else self._backend(inputs)
        cut = [len(inst) > self.tile_max_dets for inst in found]
        return [inst[: self.tile_max_dets] if c else inst for inst, c in zip(found, cut)], cut

    def predict_tiles(self, tiles: Sequence[np.ndarray]) -> List[Instances]:
        """:meth:`run_tiles` without the cut flags (SAHI's model calls this)."""
        return self.run_tiles(tiles)[0]

    def _batches(self, reader: WindowReader, windows: np.ndarray) -> Iterator[Tuple[np.ndarray, List[np.ndarray]]]:
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start : start + self.batch_size]
            yield chunk, [reader.read(*(int(v) for v in w)) for w in chunk]

    def __call__(
        self, image: Union[str, np.ndarray, WindowReader], windows: Optional[np.ndarray] = None,
        gsd: Optional[float] = None,
    ) -> TiledResult:
        """Detections of a whole image: a path (read window by window), an (H, W, 3) uint8 RGB
        array, or an open :class:`WindowReader`. ``windows`` (T, 4) XYXY replaces the grid of
        :func:`.grid.tile_windows` (e.g. SAHI's slices, for comparisons); it must be a product of
        columns and rows, as the seam rule assumes (in the pixels of the resampled image).
        ``gsd``: the image's metres per pixel (a plain image; replaces a GeoTIFF's)."""
        if isinstance(image, str):
            with open_image(image) as reader:
                return self._predict(reader, windows, gsd)
        if isinstance(image, np.ndarray):
            image = ArrayReader(image)
        return self._predict(image, windows, gsd)

    def grid(self, reader: WindowReader, windows: Optional[np.ndarray] = None) -> np.ndarray:
        """(T, 4) int XYXY: the tiles of ``reader`` (or ``windows``, checked for shape)."""
        if windows is None:
            return tile_windows((reader.height, reader.width), self.patch_size, self.overlap)
        return np.asarray(windows, dtype=np.int64).reshape(-1, 4)

    def at_model_gsd(self, source: WindowReader, gsd: Optional[float] = None) -> Tuple[WindowReader, Tensor]:
        """``source`` seen at the model's ground resolution (:func:`.reader.resample_scale`;
        itself when the scales agree or ``resample`` is off) and the (4,) XYXY factors that map
        its boxes back to the source's pixels."""
        scale = resample_scale(source, self.model_gsd, gsd) if self.resample else 1.0
        if abs(scale - 1.0) <= 1e-3:
            return source, torch.ones(4)
        size = (max(1, round(source.height * scale)), max(1, round(source.width * scale)))
        back = torch.tensor([source.width / size[1], source.height / size[0]] * 2)
        return source.resampled(*size), back

    def _predict(
        self, source: WindowReader, windows: Optional[np.ndarray] = None, gsd: Optional[float] = None
    ) -> TiledResult:
        reader, back = self.at_model_gsd(source, gsd)
        grid = self.grid(reader, windows)
        result = self.merge_tiles(reader, grid, self.detect_tiles(reader, grid))
        return self.to_source(result, source, back)

    @staticmethod
    def to_source(result: TiledResult, source: WindowReader, back: Tensor) -> TiledResult:
        """``result`` of the resampled view of :meth:`at_model_gsd`, in ``source``'s pixels."""
        inst = result.instances
        if tuple(inst.image_size) == (source.height, source.width) and bool((back == 1).all()):
            return result
        mapped = Instances((source.height, source.width))
        mapped.pred_boxes = Boxes(inst.pred_boxes.tensor * back)
        mapped.scores, mapped.pred_classes = inst.scores, inst.pred_classes
        result.instances = mapped
        return result

    def detect_tiles(
        self, reader: WindowReader, grid: np.ndarray, ids: Optional[np.ndarray] = None,
        partial: Optional[Set[int]] = None,
    ) -> TileDetections:
        """The detections of the tiles ``ids`` of ``grid`` (default: all), in image pixels, before
        the merge; with ``skip_nodata``, tiles without data are not run and boxes centred on
        nodata are dropped (:class:`.nodata.NodataFilter`). With ``partial`` given, ``ids`` are
        tiles already known to hold data and ``partial`` those that also hold nodata (the
        selection :mod:`.distributed` makes before sharing the tiles out)."""
        ids = np.arange(len(grid)) if ids is None else np.asarray(ids, dtype=np.int64)
        valid = NodataFilter(reader, self.nodata) if self.skip_nodata else None
        if partial is not None:
            run = ids
        else:
            run, partial = valid.select(grid, ids) if valid is not None else (ids, set())
        boxes, scores, classes, windows = [], [], [], []
        tiles_at_cap = 0
        tile_ids = iter(run.tolist())
        for chunk, tiles in self._batches(reader, grid[run]):
            found, cut = self.run_tiles(tiles)
            tiles_at_cap += sum(cut)
            for window, inst in zip(chunk, found):
                if next(tile_ids) in partial:
                    inst = inst[valid.keep_boxes(window, inst.pred_boxes.tensor)]
                offset = torch.tensor([window[0], window[1]] * 2, dtype=torch.float32)
                boxes.append(inst.pred_boxes.tensor.float().cpu() + offset)
                scores.append(inst.scores.float().cpu())
                classes.append(inst.pred_classes.cpu())
                windows.append(torch.as_tensor(window, dtype=torch.float32).expand(len(inst), 4))
        return TileDetections.from_tiles(boxes, scores, classes, windows, run.tolist(), num_run=len(run),
                                         num_skipped=len(ids) - len(run), tiles_at_cap=tiles_at_cap)

    def merge_tiles(self, reader: WindowReader, grid: np.ndarray, dets: TileDetections) -> TiledResult:
        """The seam merge of the detections of all tiles of ``grid`` (:func:`.merge.merge_detections`)."""
        image_hw = (reader.height, reader.width)
        grid_t = torch.as_tensor(grid, dtype=torch.float32)
        b, s, c, found = merge_detections(
            dets.boxes, dets.scores, dets.classes, dets.windows, grid_t, image_hw,
            self.model.test_nms_thresh, self.max_dets, self.edge_margin,
        )
        capped = found > self.max_dets
        if capped:
            warnings.warn(
                f"{reader.path}: {found} detections after the merge, kept the best "
                f"{self.max_dets} (--max-dets)", stacklevel=2
            )
        tiles_at_cap = dets.tiles_at_cap
        if tiles_at_cap:
            warnings.warn(
                f"{reader.path}: in {tiles_at_cap} of {len(grid)} tiles the per-tile cap of "
                f"{self.tile_max_dets} detections (--tile-max-dets) dropped detections above the "
                f"score threshold {self.score_thresh:g}: raise it or use smaller patches",
                stacklevel=2,
            )
        result = Instances(image_hw)
        result.pred_boxes = Boxes(b)
        result.scores = s
        result.pred_classes = c
        return TiledResult(result, len(grid), capped, tiles_at_cap, dets.num_skipped)
