"""Multi-process training without GPUs: detectron2 0.6's ``launch`` needs CUDA (NCCL, one GPU per
worker) and ``create_ddp_model`` (0.6 and upstream) passes ``device_ids=[local_rank]``, which
DistributedDataParallel refuses for a CPU model. Here CPU workers use gloo and no device_ids."""
import contextlib
import logging
from datetime import timedelta
from typing import Callable, Optional, Sequence
from unittest import mock

import torch.distributed as dist
import torch.multiprocessing as mp

import detectron2.utils.comm as comm
from detectron2.engine import create_ddp_model
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import _find_free_port

__all__ = ["launch", "cpu_ddp"]

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)


def launch(
    main_func: Callable,
    num_workers_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence = (),
    device: str = "cuda",
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """detectron2's ``launch``, except that with ``device="cpu"`` the workers are CPU processes
    joined by gloo (``num_workers_per_machine`` is then a process count, not a GPU count)."""
    world_size = num_machines * num_workers_per_machine
    if device != "cpu" or world_size == 1:
        d2_launch(main_func, num_workers_per_machine, num_machines=num_machines,
                  machine_rank=machine_rank, dist_url=dist_url, args=tuple(args), timeout=timeout)
        return
    if dist_url is None or dist_url == "auto":
        if num_machines > 1:
            raise ValueError("--dist-url auto works on one machine only: pass tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(
        _cpu_worker,
        nprocs=num_workers_per_machine,
        args=(main_func, world_size, num_workers_per_machine, machine_rank, dist_url, tuple(args),
              timeout),
        start_method="spawn",
    )


def _cpu_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    num_workers_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: timedelta,
) -> None:
    rank = machine_rank * num_workers_per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank,
                            timeout=timeout)
    try:
        _create_local_process_group(num_workers_per_machine)
        comm.synchronize()
        main_func(*args)
    finally:
        dist.destroy_process_group()


def _create_local_process_group(num_workers_per_machine: int) -> None:
    """``comm.get_local_rank()`` needs the group of this machine's workers."""
    if hasattr(comm, "create_local_process_group"):  # detectron2 after 0.6
        comm.create_local_process_group(num_workers_per_machine)
        return
    for i in range(dist.get_world_size() // num_workers_per_machine):
        group = dist.new_group(list(range(i * num_workers_per_machine,
                                          (i + 1) * num_workers_per_machine)))
        if i == dist.get_rank() // num_workers_per_machine:
            comm._LOCAL_PROCESS_GROUP = group


def _ddp_for_device(device: str) -> Callable:
    def create(model, **kwargs):
        if device == "cpu":
            kwargs["device_ids"] = None
        return create_ddp_model(model, **kwargs)

    return create


@contextlib.contextmanager
def cpu_ddp(device: str):
    """While building a ``DefaultTrainer`` for ``MODEL.DEVICE`` ``device``: on CPU, wrap the model
    in DistributedDataParallel without ``device_ids``."""
    if device != "cpu":
        yield
        return
    with mock.patch("detectron2.engine.defaults.create_ddp_model", _ddp_for_device(device)):
        yield
