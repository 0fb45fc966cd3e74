"""Upstream detectron2 main without compiled ops (simulated: its dummy deformable convolutions):
DCN configs fail to build with an error naming the config key; everything else builds."""
import pytest
import torch

from detectron2.modeling import build_model

from conftest import simulate_upstream_without_ops, tiny_cfg
from gfocal.utils import deform_conv_build_error, deform_conv_run_error


@pytest.fixture
def upstream_without_ops(monkeypatch):
    simulate_upstream_without_ops(monkeypatch.setattr)


@pytest.mark.parametrize("modulated", [False, True])
def test_dummy_layers_are_reported(upstream_without_ops, modulated):
    for error in (deform_conv_build_error(modulated), deform_conv_run_error(modulated)):
        assert error and "cannot be built" in error and "detectron2._C" in error


@pytest.mark.parametrize("modulated", [False, True])
def test_dcn_config_names_the_key(upstream_without_ops, modulated):
    cfg = tiny_cfg(**{"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
                      "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, True, True],
                      "MODEL.RESNETS.DEFORM_MODULATED": modulated})
    with pytest.raises(RuntimeError, match=r"MODEL.RESNETS.DEFORM_ON_PER_STAGE=.*cannot be built"):
        with torch.device("meta"):
            build_model(cfg)


def test_config_without_dcn_builds(upstream_without_ops):
    model = build_model(tiny_cfg())
    assert sum(p.numel() for p in model.parameters()) > 0


def test_installed_detectron2_reports_what_runs():
    # Whatever detectron2 is installed: a buildable layer either runs or names why it cannot.
    for modulated in (False, True):
        if deform_conv_build_error(modulated) is None:
            error = deform_conv_run_error(modulated, backward=True)
            assert error is None or "fails on cpu" in error
