"""A SAHI ``DetectionModel`` for GFL models, so SAHI's own tools (``get_sliced_prediction``,
``predict``) run them. SAHI's detectron2 wrapper takes only RetinaNet / R-CNN configs and feeds
one slice at a time; this one runs SAHI's slice batches (``batch_size``) in one forward pass
through :meth:`TiledPredictor.predict_tiles`."""
from typing import List, Optional

import numpy as np

from sahi.models.base import DetectionModel
from sahi.prediction import ObjectPrediction

from .tiled import TiledPredictor

__all__ = ["GFLDetectionModel"]


def _per_image(values, count: int) -> list:
    """SAHI passes ``[x, y]`` for one image or ``[[x, y], ...]`` for a batch."""
    if values is None:
        return [None] * count
    if len(values) and not isinstance(values[0], (list, tuple)):
        return [list(values)] * count
    return [list(v) for v in values]


class GFLDetectionModel(DetectionModel):
    """``GFLDetectionModel(config_path=..., model_path=...)`` builds a :class:`TiledPredictor`
    from a yacs config and checkpoint; ``GFLDetectionModel(model=tiled_predictor)`` wraps one
    already built. Slices are given as RGB (SAHI's convention)."""

    def load_model(self) -> None:
        from ..config import load_config

        if not self.config_path:
            raise ValueError("GFLDetectionModel needs config_path (a GFL yacs config) or model=")
        cfg = load_config(self.config_path)
        cfg.MODEL.DEVICE = str(self.device)
        self.set_model(TiledPredictor(cfg, weights=self.model_path))

    def set_model(self, model: TiledPredictor, **kwargs) -> None:
        if not isinstance(model, TiledPredictor):
            raise TypeError(f"GFLDetectionModel wraps a TiledPredictor, got {type(model).__name__}")
        self.model = model
        if self.category_mapping is None:
            num = int(model.model.num_classes)
            self.category_mapping = {str(i): str(i) for i in range(num)}
        self.category_names = list(self.category_mapping.values())

    @property
    def num_categories(self) -> int:
        return len(self.category_mapping)

    @property
    def has_mask(self) -> bool:
        return False

    def perform_inference(self, image: np.ndarray) -> None:
        self._original_predictions = self.model.predict_tiles([np.asarray(image)])

    def perform_batch_inference(self, images: List[np.ndarray]) -> None:
        """Native batching: all slices of the batch in one forward pass."""
        self._original_predictions = self.model.predict_tiles([np.asarray(i) for i in images])
        self._batch_images = None  # SAHI's sequential fallback is not needed

    def _create_object_prediction_list_from_original_predictions(
        self, shift_amount_list: Optional[list] = [[0, 0]], full_shape_list: Optional[list] = None
    ) -> None:
        predictions = self._original_predictions
        shifts = _per_image(shift_amount_list or [[0, 0]], len(predictions))
        shapes = _per_image(full_shape_list, len(predictions))
        per_image = []
        for inst, shift, shape in zip(predictions, shifts, shapes):
            keep = inst.scores >= self.confidence_threshold
            boxes = inst.pred_boxes.tensor[keep].tolist()
            scores = inst.scores[keep].tolist()
            classes = inst.pred_classes[keep].tolist()
            per_image.append([
                ObjectPrediction(
                    bbox=box, category_id=int(c), category_name=self.category_mapping[str(c)],
                    score=float(s), shift_amount=shift, full_shape=shape,
                )
                for box, s, c in zip(boxes, scores, classes)
            ])
        self._object_prediction_list_per_image = per_image
