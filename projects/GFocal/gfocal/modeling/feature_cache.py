"""A memory-bounded cache of a frozen backbone's features, keyed by the input image's content.

With every backbone parameter frozen (and frozen normalisation), the features of an image depend
on its pixels only, so training for many epochs on a small dataset recomputes the same features
over and over; on a CPU the backbone is most of a training step. The cache stores the features of
each image (one entry per distinct input, e.g. per tile and flip) and runs the backbone only on
the images of a batch it has not seen. It is off by default (``MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB``).
"""
import hashlib
from collections import OrderedDict
from typing import Callable, Dict, List

import torch
from torch import Tensor

__all__ = ["FeatureCache"]


class FeatureCache:
    """Least-recently-used cache of per-image feature dicts, at most ``max_mb`` megabytes."""

    def __init__(self, max_mb: float):
        if max_mb <= 0:
            raise ValueError(f"FeatureCache: max_mb={max_mb} must be > 0")
        self.max_bytes = int(max_mb * 2**20)
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: "OrderedDict[str, Dict[str, Tensor]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(image: Tensor) -> str:
        """Content hash of one (C, H, W) input: shape, dtype and bytes."""
        data = image.detach().contiguous().cpu()
        digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16)
        digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
        return digest.hexdigest()

    def __call__(self, x: Tensor, compute: Callable[[Tensor], Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Features of the batch ``x`` (N, C, H, W): cached ones looked up, the rest computed by
        ``compute`` on the sub-batch of unseen images (without autograd) and stored."""
        keys = [self.key(image) for image in x]
        missing = [i for i, k in enumerate(keys) if k not in self._entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: Dict[str, Dict[str, Tensor]] = {}
        if missing:
            with torch.no_grad():
                computed = compute(x[missing])
            for j, i in enumerate(missing):
                fresh[keys[i]] = {name: f[j].clone() for name, f in computed.items()}
        per_image: List[Dict[str, Tensor]] = []
        for k in keys:
            if k in fresh:
                per_image.append(fresh[k])
                self._store(k, fresh[k])
            else:
                self._entries.move_to_end(k)
                per_image.append(self._entries[k])
        return {name: torch.stack([f[name] for f in per_image]) for name in per_image[0]}

    def _store(self, key: str, features: Dict[str, Tensor]) -> None:
        size = sum(f.numel() * f.element_size() for f in features.values())
        if size > self.max_bytes or key in self._entries:
            return
        while self.num_bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.num_bytes -= sum(f.numel() * f.element_size() for f in old.values())
        self._entries[key] = features
        self.num_bytes += size
