"""Timing helpers shared by the benchmark scripts: per-stage timers on a DenseDetector and
interleaved repeats so that a shared CPU's load hits every model alike."""

import json
import os
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Sequence

from torch import nn


class StageTimer:
    """Records the wall time of a dense detector's head and the wall and CPU time (all threads of
    this process) of what runs after it.

    Hooks the head (forward pre-hook and hook) and wraps ``forward_inference`` /
    ``forward_training`` on the instance; :meth:`reset` clears the last measurement.
    """

    def __init__(self, model: nn.Module):
        self.times: Dict[str, float] = {}
        self._t: Dict[str, float] = {}
        model.head.register_forward_pre_hook(lambda m, i: self._mark("head_start"))
        model.head.register_forward_hook(lambda m, i, o: self._mark("head_end"))
        for name in ("forward_inference", "forward_training"):
            setattr(model, name, self._wrap(getattr(model, name), "after_head"))

    def _mark(self, key: str) -> None:
        self._t[key] = time.perf_counter()

    def _wrap(self, fn: Callable, key: str) -> Callable:
        def wrapped(*args, **kwargs):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            self.times[key] = time.perf_counter() - start
            self.times[key + "_cpu"] = time.process_time() - cpu_start
            return out

        return wrapped

    def reset(self) -> None:
        self.times, self._t = {}, {}

    def head_time(self) -> float:
        return self._t["head_end"] - self._t["head_start"]


def wrap_function(module, name: str, times: Dict[str, float]) -> None:
    """Replace ``module.name`` by a wrapper that adds its wall time to ``times[name]``."""
    fn = getattr(module, name)

    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return out

    setattr(module, name, wrapped)


@contextmanager
def timer(out: Dict[str, float], key: str):
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start


def interleaved(names: Sequence[str], repeats: int, run: Callable[[str], Dict[str, float]]):
    """Call ``run(name)`` ``repeats`` times per name, rotating the order every round.

    Returns ``{name: [measurement dict per repeat]}``.
    """
    results: Dict[str, List[Dict[str, float]]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in list(names[shift:]) + list(names[:shift]):
            results[name].append(run(name))
    return results


def median_of(samples: List[Dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def paired_ratio(a: List[Dict[str, float]], b: List[Dict[str, float]], key: str) -> float:
    """Median over repeats of ``a[i][key] / b[i][key]`` (the same round, so under similar load)."""
    return statistics.median(x[key] / y[key] for x, y in zip(a, b))


def save_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
