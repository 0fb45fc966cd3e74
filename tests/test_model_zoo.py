"""gfocal.model_io.model_zoo: the published-checkpoint table, offline advice, verify + convert once + cache,
and DefaultPredictor on a zoo config. A small R-18 stand-in replaces the COCO files (not
downloadable here)."""
import hashlib
import os
import urllib.error

import numpy as np
import pytest
import torch

from gfocal import model_zoo
from test_conversion import mmdet_gfl_state_dict

R18 = ("MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
       "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.GFL.NUM_CONVS", "1")


def _no_network(url, dst, progress=True):
    raise urllib.error.URLError("no network in this test")


def test_every_entry_has_a_config_and_published_name():
    assert len(model_zoo.MODELS) == 6
    for name, entry in model_zoo.MODELS.items():
        assert os.path.isfile(model_zoo.get_config_file(name)), name
        assert entry.url.startswith("https://download.openmmlab.com/mmdetection/v2.0/gfl/")
        assert entry.filename.endswith(".pth") and 40 <= entry.ap <= 49
    assert model_zoo.MODELS["mmdet/gfl_R_50_FPN_1x"].ap == 40.2
    with pytest.raises(KeyError, match="available"):
        model_zoo.get_config("gfl_R_18")


def test_offline_error_says_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    entry = model_zoo.MODELS["mmdet/gfl_R_50_FPN_1x"]
    with pytest.raises(FileNotFoundError) as info:
        model_zoo.get("gfl_R_50_FPN_1x", cache_dir=str(tmp_path))
    message = str(info.value)
    assert entry.url in message
    assert os.path.join(str(tmp_path), "mmdet", entry.filename) in message


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    """A zoo entry whose 'published' file is a random R-18 GFL in mmdet layout, in the cache."""
    torch.manual_seed(0)
    source = mmdet_gfl_state_dict(depth=18, fpn_channels=64, stacked_convs=1, make=torch.randn)
    for key, value in source.items():  # keep activations finite through the random network
        if key.endswith("running_var"):
            value.abs_().add_(1.0)
        elif value.dim() == 4:
            value.mul_(0.5 / value[0].numel() ** 0.5)
    source["bbox_head.gfl_cls.bias"].fill_(-1.0)  # scores above the threshold
    staging = tmp_path / "staging.pth"
    torch.save({"state_dict": source, "meta": {"CLASSES": ("person",) * 80}}, staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    entry = model_zoo.ZooEntry(
        "mmdet/gfl_R_50_FPN_1x.yaml", f"https://example.invalid/gfl_r18_test-{digest}.pth", 1.0, R18
    )
    (tmp_path / "mmdet").mkdir()
    os.replace(staging, tmp_path / "mmdet" / entry.filename)
    monkeypatch.setitem(model_zoo.MODELS, "mmdet/test_r18", entry)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    return source, tmp_path, entry


def test_get_converts_once_and_loads(fake_entry):
    source, cache, entry = fake_entry
    model = model_zoo.get("mmdet/test_r18", cache_dir=str(cache))
    assert not model.training
    assert torch.equal(model.head.cls_score.bias.detach(), source["bbox_head.gfl_cls.bias"])
    converted = cache / "converted" / "test_r18.pth"
    assert converted.is_file()
    os.remove(cache / "mmdet" / entry.filename)  # the cached conversion is used from now on
    assert model_zoo.get_checkpoint("test_r18", cache_dir=str(cache)) == str(converted)


def test_default_predictor_runs_on_a_zoo_config(fake_entry):
    from detectron2.engine import DefaultPredictor

    _, cache, _ = fake_entry
    cfg = model_zoo.get_config("test_r18", cache_dir=str(cache))
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 128, 192
    image = np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)  # BGR
    instances = DefaultPredictor(cfg)(image)["instances"]
    assert instances.image_size == (100, 150)
    assert len(instances) > 0 and instances.scores.min() > cfg.MODEL.GFL.SCORE_THRESH_TEST


def test_a_damaged_download_is_refused(fake_entry):
    _, cache, entry = fake_entry
    with open(cache / "mmdet" / entry.filename, "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="not the published file"):
        model_zoo.get_checkpoint("test_r18", cache_dir=str(cache))
