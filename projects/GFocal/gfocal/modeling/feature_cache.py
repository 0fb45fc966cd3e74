"""A memory-bounded cache of a frozen backbone's features, keyed by the input image's content.

With every backbone parameter frozen (and frozen normalisation), the features of an image depend
on its pixels only, so training for many epochs on a small dataset recomputes the same features
over and over; on a CPU the backbone is most of a training step. The cache stores the features of
each image (one entry per distinct input, e.g. per tile and flip) and runs the backbone only on
the images of a batch it has not seen. It is off by default (``MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB``).

With a ``directory`` (``FEATURE_CACHE_DIR``) the features are also written there, one file per
image, so that other processes (the runs of an ablation, a second training) reuse them. The file
names include a fingerprint of the backbone's weights: features of other weights are never read.
Files are written to a temporary name and renamed, so a crash or a concurrent writer never leaves
a partial file under a final name.
"""
import hashlib
import os
import tempfile
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["FeatureCache"]


class FeatureCache:
    """Least-recently-used cache of per-image feature dicts, at most ``max_mb`` megabytes."""

    def __init__(self, max_mb: float, directory: str = ""):
        if max_mb <= 0:
            raise ValueError(f"FeatureCache: max_mb={max_mb} must be > 0")
        self.max_bytes = int(max_mb * 2**20)
        self.directory = directory
        self.fingerprint = ""  # of the backbone weights; set by the owner before the first call
        self.disk_hits = 0
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: "OrderedDict[str, Dict[str, Tensor]]" = OrderedDict()

    def reset(self, fingerprint: str) -> None:
        """Serve the backbone weights of ``fingerprint`` from now on: entries kept in memory for
        other weights are dropped (files on disk carry their fingerprint in their name)."""
        self.fingerprint = fingerprint
        self._entries.clear()
        self.num_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(image: Tensor) -> str:
        """Content hash of one (C, H, W) input: shape, dtype and bytes."""
        data = image.detach().contiguous().cpu()
        digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16)
        digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
        return digest.hexdigest()

    def __call__(self, x: Tensor, compute: Callable[[Tensor], Dict[str, Tensor]],
                 save: bool = True) -> Dict[str, Tensor]:
        """Features of the batch ``x`` (N, C, H, W): cached ones looked up, the rest computed by
        ``compute`` on the sub-batch of unseen images (without autograd) and stored; in memory
        only unless ``save`` (then also in ``directory``)."""
        keys = [self.key(image) for image in x]
        fresh: Dict[str, Dict[str, Tensor]] = {}
        for i, k in enumerate(keys):
            if k not in self._entries and k not in fresh:
                loaded = self._load(k)
                if loaded is not None:
                    fresh[k] = loaded
                    self.disk_hits += 1
        missing = [i for i, k in enumerate(keys) if k not in self._entries and k not in fresh]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                computed = compute(x[missing])
            for j, i in enumerate(missing):
                fresh[keys[i]] = {name: f[j].clone() for name, f in computed.items()}
                if save:
                    self._save(keys[i], fresh[keys[i]])
        per_image: List[Dict[str, Tensor]] = []
        for k in keys:
            if k in fresh:
                per_image.append(fresh[k])
                self._store(k, fresh[k])
            else:
                self._entries.move_to_end(k)
                per_image.append(self._entries[k])
        return {name: torch.stack([f[name] for f in per_image]) for name in per_image[0]}

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{self.fingerprint}-{key}.pt")

    def _load(self, key: str) -> Optional[Dict[str, Tensor]]:
        if not self.directory:
            return None
        path = self._path(key)
        if not os.path.isfile(path):
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # unreadable (e.g. damaged): recompute and overwrite
            return None

    def _save(self, key: str, features: Dict[str, Tensor]) -> None:
        if not self.directory:
            return
        os.makedirs(self.directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({k: v.cpu() for k, v in features.items()}, f)
            os.replace(tmp, self._path(key))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _store(self, key: str, features: Dict[str, Tensor]) -> None:
        size = sum(f.numel() * f.element_size() for f in features.values())
        if size > self.max_bytes or key in self._entries:
            return
        while self.num_bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.num_bytes -= sum(f.numel() * f.element_size() for f in old.values())
        self._entries[key] = features
        self.num_bytes += size
