"""Tiled prediction of whole images: several tiles per forward pass, one merge per image."""
import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from detectron2.config import configurable
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from ..model_io.checkpoint import GFLCheckpointer
from ..engine.hooks.ema import apply_checkpoint_ema
from ..tiling import check_tiling, tile_windows
from .merge import merge_detections
from .reader import WindowReader, open_image, resample_scale

__all__ = ["TiledPredictor", "TiledResult", "ArrayReader", "PRECISIONS"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


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
    tiles_at_cap: int  # tiles whose detections reached the model's per-tile cap


class TiledPredictor:
    """Run a dense detector on a whole image cut into overlapping square patches.

    Patches are read window by window (:mod:`.reader`), fed ``batch_size`` at a time at the
    image's own pixel scale (no test-time resize: an aerial model is trained at one ground
    resolution), and their detections merged across seams by :func:`.merge.merge_detections`
    (the seam rule, then class-wise NMS at the model's ``test_nms_thresh``, then ``max_dets``).

    ``precision="bf16"`` runs backbone and head under CPU/CUDA autocast in bfloat16; box decoding,
    NMS and the merge stay in float32 (bfloat16 has 8 significant bits: pixel coordinates of a
    large image would be off by several pixels). ``channels_last`` stores weights and input
    NHWC, which oneDNN convolutions run faster on recent CPUs.
    """

    @configurable
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        input_format: str,
        patch_size: int,
        overlap: int,
        batch_size: int = 4,
        max_dets: int = 10000,
        score_thresh: Optional[float] = None,
        precision: str = "fp32",
        channels_last: bool = False,
        edge_margin: float = 2.0,
        model_gsd: float = 0.0,
        resample: bool = True,
    ):
        """
        Args:
            model: a detectron2 dense detector (``GFL``) in eval mode with its weights loaded.
            input_format: "RGB" or "BGR", the channel order the model takes.
            patch_size, overlap: the tiling grid in pixels (:func:`.grid.tile_windows`).
            batch_size: tiles per forward pass.
            max_dets: detections kept per whole image after the merge.
            score_thresh: the model's ``test_score_thresh`` (None keeps the config's).
            precision: "fp32" or "bf16" (autocast of backbone and head).
            channels_last: NHWC weights and input.
            edge_margin: pixels within which a box "touches" a tile edge (seam rule; < 0: off).
            model_gsd: metres per pixel the model was trained at (``INPUT.GSD``; 0: unknown).
            resample: read each image resampled to ``model_gsd`` when its own GSD is known (a
                GeoTIFF's transform, or ``gsd`` of :meth:`__call__`); boxes are mapped back.
        """
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT={input_format!r}: the tiled predictor takes RGB or BGR")
        if precision not in PRECISIONS:
            raise ValueError(f"--precision {precision!r} must be one of {PRECISIONS}")
        if batch_size < 1:
            raise ValueError(f"--batch-size {batch_size} must be >= 1")
        if max_dets < 1:
            raise ValueError(f"--max-dets {max_dets} must be >= 1")
        strides = getattr(model, "strides", None) or [32]
        check_tiling(patch_size, overlap, max(strides))
        self.model = model.eval()
        self.input_format = input_format
        self.patch_size, self.overlap = int(patch_size), int(overlap)
        self.batch_size, self.max_dets = int(batch_size), int(max_dets)
        if score_thresh is not None:
            if not 0.0 <= score_thresh <= 1.0:
                raise ValueError(f"--score-thresh {score_thresh} must be in [0, 1]")
            self.model.test_score_thresh = float(score_thresh)
        self.precision, self.channels_last = precision, channels_last
        self.edge_margin = float(edge_margin)
        if not model_gsd >= 0:
            raise ValueError(f"INPUT.GSD={model_gsd} must be > 0 (metres per pixel), or 0 for unknown")
        self.model_gsd, self.resample = float(model_gsd), bool(resample)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg, weights: Optional[str] = None, **kwargs):
        """Build the model of a yacs config (``MODEL.WEIGHTS`` or ``weights`` loaded); the patch
        size defaults to the config's test size ``INPUT.MIN_SIZE_TEST``, the overlap to a quarter
        of the patch. Other keyword arguments are passed through."""
        cfg = cfg.clone()
        cfg.defrost()
        if cfg.MODEL.get("EFFICIENTNET_LITE") is not None:
            # The training-time feature cache would keep every tile's features: off here.
            cfg.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB = 0
            cfg.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_DIR = ""
        model = build_model(cfg)
        GFLCheckpointer(model).load(weights or cfg.MODEL.WEIGHTS)
        apply_checkpoint_ema(cfg, model, weights or cfg.MODEL.WEIGHTS)  # MODEL_EMA: averaged weights
        patch = kwargs.pop("patch_size", None) or int(cfg.INPUT.MIN_SIZE_TEST)
        overlap = kwargs.pop("overlap", None)
        return {
            "model": model,
            "input_format": cfg.INPUT.FORMAT,
            "patch_size": patch,
            "overlap": patch // 4 if overlap is None else overlap,
            "model_gsd": float(cfg.INPUT.get("GSD", 0.0)),
            **{k: v for k, v in kwargs.items() if v is not None},
        }

    # ------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.model.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def predict_tiles(self, tiles: Sequence[np.ndarray]) -> List[Instances]:
        """One forward pass over a batch of (h, w, 3) uint8 RGB tiles; per tile its
        :class:`Instances` in tile pixels (the model's own NMS and per-tile cap applied)."""
        model = self.model
        inputs = []
        for tile in tiles:
            if self.input_format == "BGR":
                tile = tile[:, :, ::-1]
            image = torch.as_tensor(np.ascontiguousarray(tile.transpose(2, 0, 1)), dtype=torch.float32)
            inputs.append({"image": image, "height": tile.shape[0], "width": tile.shape[1]})
        images = model.preprocess_image(inputs)
        x = images.tensor
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            features = model.backbone(x)
            features = [features[f] for f in model.head_in_features]
            predictions = model.head(features)
        if self.precision != "fp32":
            features = [f.float() for f in features]
            predictions = tuple(
                None if p is None else [t.float() for t in p] for p in predictions
            )
        results = model.forward_inference(images, features, predictions)
        return [
            detector_postprocess(r, inp["height"], inp["width"]) for r, inp in zip(results, inputs)
        ]

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

    def _predict(
        self, source: WindowReader, windows: Optional[np.ndarray] = None, gsd: Optional[float] = None
    ) -> TiledResult:
        # The image at the model's ground resolution (reader.py); boxes are scaled back below.
        reader, back = source, torch.ones(4)
        scale = resample_scale(source, self.model_gsd, gsd) if self.resample else 1.0
        if abs(scale - 1.0) > 1e-3:
            size = (max(1, round(source.height * scale)), max(1, round(source.width * scale)))
            reader = source.resampled(*size)
            back = torch.tensor([source.width / size[1], source.height / size[0]] * 2)
        image_hw = (reader.height, reader.width)
        if windows is None:
            grid = tile_windows(image_hw, self.patch_size, self.overlap)
        else:
            grid = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
        per_tile_cap = getattr(self.model, "max_detections_per_image", None)
        boxes, scores, classes, windows = [], [], [], []
        tiles_at_cap = 0
        for chunk, tiles in self._batches(reader, grid):
            for window, inst in zip(chunk, self.predict_tiles(tiles)):
                if per_tile_cap is not None and len(inst) >= per_tile_cap:
                    tiles_at_cap += 1
                offset = torch.tensor([window[0], window[1]] * 2, dtype=torch.float32)
                boxes.append(inst.pred_boxes.tensor.float() + offset)
                scores.append(inst.scores.float())
                classes.append(inst.pred_classes)
                windows.append(torch.as_tensor(window, dtype=torch.float32).expand(len(inst), 4))
        grid_t = torch.as_tensor(grid, dtype=torch.float32)
        b, s, c, found = merge_detections(
            torch.cat(boxes).cpu(), torch.cat(scores).cpu(), torch.cat(classes).cpu(),
            torch.cat(windows), grid_t, image_hw, self.model.test_nms_thresh,
            self.max_dets, self.edge_margin,
        )
        capped = found > self.max_dets
        if capped:
            warnings.warn(
                f"{reader.path}: {found} detections after the merge, kept the best "
                f"{self.max_dets} (--max-dets)", stacklevel=2
            )
        if tiles_at_cap:
            warnings.warn(
                f"{reader.path}: {tiles_at_cap} of {len(grid)} tiles reached the model's "
                f"{per_tile_cap} detections per tile (TEST.DETECTIONS_PER_IMAGE): raise it or "
                "use smaller patches", stacklevel=2
            )
        result = Instances((source.height, source.width))
        result.pred_boxes = Boxes(b * back)  # in the source image's pixels
        result.scores = s
        result.pred_classes = c
        return TiledResult(result, len(grid), capped, tiles_at_cap)
