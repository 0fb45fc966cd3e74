"""Two gloo workers with one image each give the losses and gradients of one process with both
images: the positive count and the box-weight sum are averaged across workers.

With DDP, each worker's gradient is of its own loss and DDP averages them, so the exact relations
are: mean over workers of each loss = the single-process loss, and DDP gradient = single-process
gradient. They hold while the normalisers (averaged positive count, averaged weight sum) are above
their clamp at 1, which the test checks. (detectron2 0.6's launch needs CUDA: the test starts its
own process group.)
"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import gfocal.modeling.gfl as gfl_module
from conftest import make_instances, tiny_cfg

WORLD_SIZE = 2


def _cfg():
    # PRIOR_PROB 0.5: initial box weights (max class scores) near 0.5, so the averaged weight
    # sum stays above the clamp at 1. Frozen BN-free backbone (GN) keeps images independent.
    return tiny_cfg(**{"MODEL.GFL.PRIOR_PROB": 0.5})


def _inputs():
    g = torch.Generator().manual_seed(3)
    size = (96, 128)
    boxes = [
        [[10.0, 12.0, 60.0, 70.0]],
        [[5.0, 5.0, 40.0, 30.0], [50.0, 20.0, 120.0, 90.0], [70.0, 60.0, 100.0, 94.0]],
    ]
    classes = [[0], [1, 2, 1]]
    return [
        {"image": torch.rand(3, *size, generator=g) * 255, "instances": make_instances(size, b, c)}
        for b, c in zip(boxes, classes)
    ]


def _recording_normalisers(log):
    real = gfl_module.all_reduce_mean

    def wrapped(value):
        out = real(value)
        log.append(float(out))
        return out

    return wrapped


def _losses_and_grads(model, inputs, normalisers):
    model.zero_grad()
    with EventStorage():
        losses = model(inputs)
    sum(losses.values()).backward()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in losses.items()}, grads, normalisers


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD_SIZE
    )
    try:
        model = build_model(_cfg())
        model.load_state_dict(torch.load(os.path.join(folder, "init.pth")))
        model.train()
        normalisers = []
        gfl_module.all_reduce_mean = _recording_normalisers(normalisers)
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        result = _losses_and_grads(ddp, [_inputs()[rank]], normalisers)
        torch.save(result, os.path.join(folder, f"rank{rank}.pth"))
    finally:
        dist.destroy_process_group()


def test_two_workers_equal_one_process_with_both_images(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model(_cfg())
    model.train()
    torch.save(model.state_dict(), str(tmp_path / "init.pth"))
    single_norms = []
    monkeypatch.setattr(gfl_module, "all_reduce_mean", _recording_normalisers(single_norms))
    single_losses, single_grads, _ = _losses_and_grads(model, _inputs(), single_norms)
    single_norms = list(single_norms)
    # Sensitivity: normalising each image by its own counts (no averaging) gives other losses.
    local = [_losses_and_grads(model, [x], [])[0] for x in _inputs()]
    assert abs(sum(l["loss_cls"] for l in local) / 2 - single_losses["loss_cls"]) > 1e-3 * single_losses["loss_cls"]

    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD_SIZE, start_method="spawn")
    results = [torch.load(str(tmp_path / f"rank{r}.pth")) for r in range(WORLD_SIZE)]

    for losses, _, norms in results:
        # Each worker divides by the mean over workers of the positive count / weight sum, i.e.
        # by the single process's normaliser / WORLD_SIZE, and its clamp at 1 is inactive.
        assert len(norms) == len(single_norms) and min(norms) > 1.0
        torch.testing.assert_close([n * WORLD_SIZE for n in norms], single_norms, rtol=1e-5, atol=0)
    for key, value in single_losses.items():
        mean = sum(r[0][key] for r in results) / WORLD_SIZE
        assert abs(mean - value) <= 1e-5 * abs(value), (key, mean, value)
    for rank_grads in (results[0][1], results[1][1]):
        assert rank_grads.keys() == single_grads.keys()
        for name, grad in single_grads.items():
            # float32 sums in another order: compare each tensor as a whole.
            error = float((rank_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12))
            assert error < 1e-4, (name, error)
