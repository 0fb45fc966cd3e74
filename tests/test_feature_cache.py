"""The frozen-backbone feature cache (MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB)."""
import pytest
import torch

from gfocal.modeling.efficientnet_lite import EfficientNetLite
from gfocal.modeling.feature_cache import FeatureCache


def lite(cache_mb=0, freeze_at=5):
    torch.manual_seed(0)
    return EfficientNetLite(["c3", "c4", "c5"], freeze_at=freeze_at, feature_cache_mb=cache_mb).eval()


def test_cached_features_equal_computed_and_skip_the_backbone():
    plain, cached = lite(), lite(cache_mb=100)
    cached.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 64, 64)
    want = plain(x)
    got = cached(x[:2])  # two images seen
    for k in want:
        torch.testing.assert_close(got[k], want[k][:2], rtol=1e-4, atol=1e-5)
    cache = cached.feature_cache
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)

    calls = []
    original = cached._forward
    cached._forward = lambda t: calls.append(len(t)) or original(t)
    got = cached(x[[2, 0, 1]])  # one new image, two from the cache, in another order
    assert calls == [1] and (cache.hits, cache.misses) == (2, 3)
    for k in want:
        torch.testing.assert_close(got[k], want[k][[2, 0, 1]], rtol=1e-4, atol=1e-5)
    # A flipped image is another input: computed, not looked up.
    cached(x[:1].flip(-1))
    assert calls == [1, 1]


def test_cache_stays_within_its_budget():
    cache = FeatureCache(max_mb=1)
    one = {"c": torch.zeros(64 * 1024)}  # 256 KiB per image
    for i in range(6):
        cache(torch.full((1, 1, 2, 2), float(i)), lambda t: {"c": one["c"][None].expand(len(t), -1)})
    assert len(cache) == 4 and cache.num_bytes == 4 * 256 * 1024
    # The oldest entries went first: image 0 is recomputed, image 5 is a hit.
    hits = cache.hits
    cache(torch.full((1, 1, 2, 2), 5.0), lambda t: {"c": one["c"][None].expand(len(t), -1)})
    assert cache.hits == hits + 1


def test_cache_needs_a_fully_frozen_backbone():
    with pytest.raises(ValueError, match="FEATURE_CACHE_MB.*FREEZE_AT=5"):
        lite(cache_mb=100, freeze_at=3)
