"""Whole-image prediction in several processes, on one machine or several (torch.distributed).

Every process walks the same list of images. Per image, each rank reads the masks of every
``world_size``-th tile, and the tiles found to hold data, numbered one after the other over all
images, are dealt out in turn (tile ``g`` to rank ``g % world_size``): a folder of small images
is shared image by image, one large image tile by tile, and the ranks run equal shares whatever
the nodata layout. After each image the shares are gathered
(``detectron2.utils.comm.all_gather``, over gloo also under NCCL), put back in tile order and
merged by rank 0, which alone writes: the merge sees the tensors one process would have made.
Launch through :func:`gfocal.engine.launch` (detectron2's ``launch``; CPU workers on gloo).
"""
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

import detectron2.utils.comm as comm

from .nodata import NodataFilter
from .reader import ImageReadError, WindowReader, open_image
from .tile_detections import TileDetections
from .tiled import TiledPredictor, TiledResult

__all__ = ["ImagePrediction", "check_num_devices", "cpu_threads_per_process", "predict_images",
           "tile_share"]


def check_num_devices(num_gpus: int, device: str) -> None:
    """Refuse a ``--num-gpus`` that the device cannot serve (ValueError naming the flag): more
    processes than CUDA devices present, a fixed ``cuda:K`` with several processes, or several
    processes on a device other than CUDA or CPU. On CPU, ``--num-gpus`` counts processes."""
    if num_gpus < 1:
        raise ValueError(f"--num-gpus {num_gpus} must be >= 1")
    kind = device.split(":")[0]
    if kind == "cuda":
        present = torch.cuda.device_count()
        if num_gpus > present:
            raise ValueError(
                f"--num-gpus {num_gpus} is greater than the {present} CUDA device"
                f"{'' if present == 1 else 's'} present (MODEL.DEVICE {device}); pass --num-gpus "
                f"{max(present, 1)}{'' if present else ' with --device cpu'}"
            )
        if ":" in device and num_gpus > 1:
            raise ValueError(f"--device {device} fixes one GPU: with --num-gpus {num_gpus} pass "
                             "--device cuda (each process takes the GPU of its local rank)")
    elif kind != "cpu" and num_gpus > 1:
        raise ValueError(f"--num-gpus {num_gpus}: several processes run on cuda or cpu, not {device}")


def cpu_threads_per_process(num_local_processes: int) -> int:
    """Torch threads of each of ``num_local_processes`` CPU workers: the machine's cores shared
    out (``OMP_NUM_THREADS`` wins when set), so that the workers do not oversubscribe them."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, num_local_processes))


def tile_share(num_tiles: int, offset: int, rank: int, world_size: int) -> np.ndarray:
    """The tiles of one image that ``rank`` runs: tile ``t`` of an image whose first tile is
    number ``offset`` of the whole run goes to rank ``(offset + t) % world_size``."""
    return np.flatnonzero((offset + np.arange(num_tiles)) % world_size == rank)


@dataclass
class ImagePrediction:
    """One image of :func:`predict_images`: on rank 0 its open ``reader`` and merged ``result``,
    or the ``error`` that made it skipped; on other ranks ``result`` is None. ``tiles_run``: the
    tiles this rank ran."""

    path: str
    reader: Optional[WindowReader] = None
    result: Optional[TiledResult] = None
    error: Optional[str] = None
    tiles_run: int = 0


def _check_same_inputs(paths: Sequence[str]) -> None:
    lists = comm.all_gather(list(paths))
    if any(other != lists[0] for other in lists[1:]):
        raise ValueError("the processes (machines) see different input lists: give every machine "
                         "the same inputs, at the same paths (a shared file system)")


def _select(predictor: TiledPredictor, reader: WindowReader, grid: np.ndarray, ids: np.ndarray):
    """The tiles of ``ids`` with data and those of them that also hold nodata."""
    if not predictor.skip_nodata:
        return ids, set()
    return NodataFilter(reader, predictor.nodata).select(grid, ids)


def predict_images(
    predictor: TiledPredictor, paths: Sequence[str], skip_unreadable: bool = False,
    gsd: Optional[float] = None,
) -> Iterator[ImagePrediction]:
    """Predict ``paths`` in order, shared among the processes of ``torch.distributed`` (one
    process: all of it). Per image, the ranks first read the masks of a share of its tiles each
    (:class:`.nodata.NodataFilter`), then deal out the tiles with data: the work is shared
    evenly, whatever the nodata layout. Every rank must consume the iterator to the end (each
    image is a collective step). An image that fails to read on any rank raises
    :class:`ImageReadError` on every rank, or with ``skip_unreadable`` comes out with its
    ``error`` and is left out. Each image is predicted at the model's ground resolution
    (:meth:`.tiled.TiledPredictor.at_model_gsd`; ``gsd``: the images' own, for plain images)."""
    rank, world = comm.get_rank(), comm.get_world_size()
    _check_same_inputs(paths)
    offset = 0  # tiles with data dealt out so far
    for path in paths:
        reader, error, selected, dets = None, None, (np.zeros(0, dtype=np.int64), set()), None
        try:
            try:
                reader = open_image(path)
                view, back = predictor.at_model_gsd(reader, gsd)
                grid = predictor.grid(view)
                selected = _select(predictor, view, grid, tile_share(len(grid), 0, rank, world))
            except ImageReadError as e:
                error = str(e)
            gathered = comm.all_gather((selected, error))
            error = next((e for _, e in gathered if e is not None), None)
            if error is None:
                run = np.sort(np.concatenate([r for (r, _), _ in gathered]))
                partial = set().union(*(p for (_, p), _ in gathered))
                mine = run[tile_share(len(run), offset, rank, world)]
                try:
                    dets = predictor.detect_tiles(view, grid, mine, partial & set(mine.tolist()))
                except ImageReadError as e:
                    error = str(e)
                gathered = comm.all_gather((dets, error))
                error = next((e for _, e in gathered if e is not None), None)
            if error is not None:
                if not skip_unreadable:
                    raise ImageReadError(error)
                yield ImagePrediction(path, error=error)
                continue
            offset += len(run)
            result = None
            if rank == 0:
                merged = TileDetections.cat([d for d, _ in gathered])
                merged.num_skipped = len(grid) - len(run)
                result = predictor.to_source(predictor.merge_tiles(view, grid, merged), reader, back)
            yield ImagePrediction(path, reader, result, tiles_run=dets.num_run)
        finally:
            if reader is not None:
                reader.close()
