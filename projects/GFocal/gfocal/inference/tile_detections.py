"""The detections of some tiles of one whole image, before the seam merge.

One process predicts a share of the tiles (:meth:`.tiled.TiledPredictor.detect_tiles`); the
shares of several processes are put back in tile order by :meth:`TileDetections.cat`, so that
the merge sees the very tensors one process would have produced.
"""
from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch import Tensor

__all__ = ["TileDetections"]


@dataclass
class TileDetections:
    """Boxes (N, 4) XYXY in image pixels, scores (N,), classes (N,), the window (N, 4) and grid
    index (N,) of the tile each box comes from; tiles run, skipped as nodata, and at the model's
    per-tile cap. CPU tensors (they are sent between processes)."""

    boxes: Tensor
    scores: Tensor
    classes: Tensor
    windows: Tensor
    tile_ids: Tensor
    num_run: int = 0
    num_skipped: int = 0
    tiles_at_cap: int = 0

    @classmethod
    def empty(cls) -> "TileDetections":
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))

    @classmethod
    def from_tiles(cls, boxes: List[Tensor], scores: List[Tensor], classes: List[Tensor],
                   windows: List[Tensor], tile_ids: List[int], **counts) -> "TileDetections":
        """From per-tile lists (one entry per tile run, in tile order)."""
        if not boxes:
            out = cls.empty()
            for key, value in counts.items():
                setattr(out, key, value)
            return out
        sizes = torch.tensor([len(b) for b in boxes])
        return cls(
            torch.cat(boxes).float().cpu(), torch.cat(scores).float().cpu(),
            torch.cat(classes).long().cpu(), torch.cat(windows).float().cpu(),
            torch.repeat_interleave(torch.as_tensor(tile_ids, dtype=torch.long), sizes), **counts,
        )

    @classmethod
    def cat(cls, parts: Sequence["TileDetections"]) -> "TileDetections":
        """The union of shares of disjoint tiles, boxes ordered by tile (within a tile, as
        predicted): the order a single process produces."""
        order = torch.argsort(torch.cat([p.tile_ids for p in parts]), stable=True)
        return cls(
            torch.cat([p.boxes for p in parts])[order], torch.cat([p.scores for p in parts])[order],
            torch.cat([p.classes for p in parts])[order], torch.cat([p.windows for p in parts])[order],
            torch.cat([p.tile_ids for p in parts])[order],
            sum(p.num_run for p in parts), sum(p.num_skipped for p in parts),
            sum(p.tiles_at_cap for p in parts),
        )
