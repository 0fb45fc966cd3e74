"""The frozen-backbone feature cache (MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB)."""
import os

import pytest
import torch

from gfocal.modeling.efficientnet_lite import EfficientNetLite
from gfocal.modeling.feature_cache import FeatureCache


def lite(cache_mb=0, freeze_at=5):
    torch.manual_seed(0)
    # Training mode: the cache serves the training loop only (in eval mode it is bypassed).
    return EfficientNetLite(["c3", "c4", "c5"], freeze_at=freeze_at, feature_cache_mb=cache_mb).train()


def test_cached_features_equal_computed_and_skip_the_backbone():
    plain, cached = lite().eval(), lite(cache_mb=100)
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


def test_cache_needs_frozen_stages():
    with pytest.raises(ValueError, match="FEATURE_CACHE_MB.*FREEZE_AT >= 1"):
        lite(cache_mb=100, freeze_at=0)


def test_partly_frozen_backbone_caches_the_frozen_stages_and_trains_the_rest():
    """FREEZE_AT 4 with the cache: the stages up to c4 are served from the cache, the c5 stages
    run on top at every step and train; updating them keeps the cache valid."""
    plain, cached = lite(freeze_at=4), lite(cache_mb=100, freeze_at=4)
    cached.load_state_dict(plain.state_dict())
    trainable = {n.split(".")[1] for n, p in cached.named_parameters() if p.requires_grad}
    assert trainable and min(int(i) for i in trainable) == cached._num_frozen_blocks
    x = torch.randn(2, 3, 64, 64)
    want = plain(x)
    calls = _counting(cached)
    got = cached(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert set(got) == {"c3", "c4", "c5"} and calls == [2]
    got["c5"].sum().backward()
    grads = [p.grad for p in cached.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    fingerprint = cached.feature_cache.fingerprint
    with torch.no_grad():  # an optimizer step on the trainable stages
        for p in cached.parameters():
            if p.requires_grad:
                p.add_(0.01 * p.grad)
    cached.train()  # a train/eval switch re-checks the fingerprint
    again = cached(x)
    assert calls == [2] and cached.feature_cache.fingerprint == fingerprint  # served from cache
    torch.testing.assert_close(again["c4"], got["c4"])
    assert not torch.equal(again["c5"], got["c5"])  # the trained stages are applied
    with torch.no_grad():  # a frozen weight changes: other features, the cache starts anew
        cached._conv_stem.weight.mul_(2)
    cached.train()
    cached(x)
    assert calls == [2, 2] and cached.feature_cache.fingerprint != fingerprint


def _counting(model):
    calls = []
    original = model._forward
    model._forward = lambda t: calls.append(len(t)) or original(t)
    return calls


def test_disk_cache_is_shared_by_processes_with_the_same_weights(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    first = lite(cache_mb=100)
    first.feature_cache.directory = str(tmp_path)
    want = first(x)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.endswith(".pt") for f in files)

    second = EfficientNetLite(["c3", "c4", "c5"], freeze_at=5, feature_cache_mb=100, feature_cache_dir=str(tmp_path))
    second.load_state_dict(first.state_dict())
    calls = _counting(second.train())
    got = second(x)
    assert calls == [] and second.feature_cache.disk_hits == 2
    for k in want:
        assert torch.equal(got[k], want[k])

    # Other weights: other file names, nothing read from the first backbone's files.
    other = lite(cache_mb=100)
    with torch.no_grad():
        other._conv_stem.weight.mul_(2)
    other.feature_cache.directory = str(tmp_path)
    calls = _counting(other)
    other(x)
    assert calls == [2] and len(list(tmp_path.iterdir())) == 4

    # A damaged file is recomputed and rewritten, not read.
    for p in tmp_path.iterdir():
        p.write_bytes(b"garbage")
    third = lite(cache_mb=100)
    third.load_state_dict(first.state_dict())
    third.feature_cache.directory = str(tmp_path)
    calls = _counting(third)
    got = third(x)
    assert calls == [2]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_cache_dir_without_cache_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="FEATURE_CACHE_DIR.*needs FEATURE_CACHE_MB > 0"):
        EfficientNetLite(["c3"], freeze_at=5, feature_cache_dir=str(tmp_path))


def test_predictors_keep_no_features_of_the_images_they_see():
    """The tree config caches features (FEATURE_CACHE_MB 3000) for its training loop; plain
    DefaultPredictor(cfg), GFLPredictor and TiledPredictor with that config run in eval mode and
    must not keep one entry per image (issue: RSS grew with every distinct image)."""
    import numpy as np
    from detectron2.engine import DefaultPredictor

    from conftest import tiny_cfg
    from gfocal.inference import TiledPredictor
    from gfocal.inference.predictor import GFLPredictor

    cfg = tiny_cfg("trees/gfl_lite0_trees.yaml", **{"MODEL.EFFICIENTNET_LITE.WEIGHTS": "",
                                                     "MODEL_EMA.ENABLED": False})
    assert cfg.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB > 0
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(4)]
    for predictor in (DefaultPredictor(cfg), GFLPredictor(cfg)):
        cache = predictor.model.backbone.bottom_up.feature_cache
        assert cache is not None  # built, but bypassed outside training
        for image in images:
            predictor(image)
        assert (len(cache), cache.num_bytes, cache.misses) == (0, 0, 0)
    tiled = TiledPredictor(cfg, patch_size=96, overlap=32)
    for image in images:
        tiled(image)
    cache = tiled.model.backbone.bottom_up.feature_cache
    assert cache is None or len(cache) == 0
    # The training loop still uses it.
    backbone = predictor.model.backbone.bottom_up.train()
    backbone(torch.zeros(2, 3, 64, 64))
    assert len(backbone.feature_cache) == 1


def test_cache_at_test_serves_evaluation_from_the_features_training_wrote(tmp_path):
    """FEATURE_CACHE_AT_TEST: an evaluating process reads the features a training process wrote
    to FEATURE_CACHE_DIR (the main job's evaluation of the training tiles), exactly; without the
    key evaluation computes them again; new weights are never served old features."""
    x = torch.randn(2, 3, 64, 64)
    trainer = EfficientNetLite(["c3", "c4", "c5"], freeze_at=5, feature_cache_mb=100,
                               feature_cache_dir=str(tmp_path)).train()
    want = trainer(x)  # written to disk by the "training" process

    evaluator = EfficientNetLite(["c3", "c4", "c5"], freeze_at=5, feature_cache_mb=100,
                                 feature_cache_dir=str(tmp_path), feature_cache_at_test=True)
    evaluator.load_state_dict(trainer.state_dict())
    eval_calls = _counting(evaluator.eval())
    got = evaluator(x)
    assert eval_calls == [] and evaluator.feature_cache.disk_hits == 2
    for k in want:
        assert torch.equal(got[k], want[k])

    # Without the key, eval mode computes (the default for predictors).
    plain = EfficientNetLite(["c3", "c4", "c5"], freeze_at=5, feature_cache_mb=100,
                             feature_cache_dir=str(tmp_path))
    plain.load_state_dict(trainer.state_dict())
    calls = _counting(plain.eval())
    plain(x)
    assert calls == [2] and plain.feature_cache.disk_hits == 0

    # Other weights loaded between two evaluations: the memory entries go, the new weights'
    # features are computed (and files of the old weights are not read).
    with torch.no_grad():
        changed = {k: v * 2 if k == "_conv_stem.weight" else v for k, v in trainer.state_dict().items()}
    evaluator.load_state_dict(changed)
    evaluator.eval()  # a new phase: the fingerprint is checked again
    files = sorted(os.listdir(tmp_path))
    evaluator(x)
    assert eval_calls == [2] and len(evaluator.feature_cache) == 2
    # kept in memory (a second evaluation in this process reads them), not written: files are
    # training's
    assert sorted(os.listdir(tmp_path)) == files
    evaluator(x)
    assert eval_calls == [2]


def test_cache_at_test_needs_a_cache():
    with pytest.raises(ValueError, match="FEATURE_CACHE_AT_TEST=True needs FEATURE_CACHE_MB > 0"):
        EfficientNetLite(["c3"], freeze_at=5, feature_cache_at_test=True)
