"""What differs between detectron2 0.6 and upstream main (docs/detectron2_versions.md): the SGD's
``foreach``, a setuptools without ``pkg_resources``, and the LazyConfig schedule under a
``train.max_iter`` override."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import hooks
from detectron2.solver import build_lr_scheduler
from detectron2.solver import build as solver_build
from detectron2.utils.events import EventStorage

from conftest import CONFIG_DIR, REPO_ROOT, simulate_upstream_solver
from gfocal import add_gfl_config
from gfocal.engine.solver import detectron2_sgd_foreach, sgd


def _params():
    return [{"params": [torch.nn.Parameter(torch.zeros(2))]}]


def test_sgd_foreach_follows_detectron2s_build_optimizer(monkeypatch):
    yaml_foreach = solver_build.build_optimizer(get_cfg(), torch.nn.Linear(1, 1)).defaults["foreach"]
    assert sgd(_params(), lr=0.1).defaults["foreach"] == yaml_foreach == detectron2_sgd_foreach()
    simulate_upstream_solver(monkeypatch.setattr)  # main: foreach=True
    assert solver_build.build_optimizer(get_cfg(), torch.nn.Linear(1, 1)).defaults["foreach"] is True
    assert sgd(_params(), lr=0.1).defaults["foreach"] is True
    assert sgd(_params(), lr=0.1, foreach=False).defaults["foreach"] is False  # explicit wins


def test_project_imports_without_pkg_resources():
    """With setuptools >= 81 (no pkg_resources) detectron2.model_zoo cannot be imported; nothing
    of the project needs it."""
    code = (
        "import sys, runpy; sys.modules['pkg_resources'] = None\n"
        "try:\n    import detectron2.model_zoo\nexcept ImportError: pass\n"
        "else:\n    raise SystemExit('pkg_resources was not hidden')\n"
        "for m in [k for k in sys.modules if k.startswith('detectron2.model_zoo')]: del sys.modules[m]\n"
        "import gfocal, gfocal.model_io.model_zoo, gfocal.inference.predictor, gfocal.model_io.checkpoint, gfocal.model_io.export\n"
        "sys.path[:0] = ['.', 'tools']\n"
        "import train_net, lazyconfig_train_net, demo, main_job, export_model\n"
        "from detectron2.config import LazyConfig\n"
        "LazyConfig.load('configs/trees/gfl_lite0_trees.py')\n"
        "bad = [k for k in sys.modules if k.startswith('detectron2.model_zoo')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def _lrs(lr_multiplier, max_iter: int, base_lr: float):
    """The lr of each iteration as lazyconfig_train_net.py's LRScheduler hook sets it."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    hook = hooks.LRScheduler(optimizer=optimizer, scheduler=lr_multiplier)
    hook.trainer = SimpleNamespace(max_iter=max_iter, iter=0, optimizer=optimizer)
    lrs = []
    with EventStorage() as storage:
        hook.trainer.storage = storage
        hook.before_train()
        for it in range(max_iter):
            hook.trainer.iter = it
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            hook.after_step()
    return lrs


def test_lazy_max_iter_override_compresses_the_whole_schedule():
    """``train.max_iter=20`` on the tree config (900 iterations, warmup 50, steps 700 and 850):
    detectron2 evaluates the LazyConfig multiplier at ``iter / train.max_iter``, so the whole
    schedule is compressed into 20 iterations. The YAML ``SOLVER.MAX_ITER 20`` instead keeps the
    steps in iterations (both beyond 20: dropped) and the warmup of 50 iterations."""
    lazy = LazyConfig.load(os.path.join(CONFIG_DIR, "trees", "gfl_lite0_trees.py"))
    lazy = LazyConfig.apply_overrides(lazy, ["train.max_iter=20"])
    base_lr = lazy.optimizer.lr
    lazy_lrs = _lrs(instantiate(lazy.lr_multiplier), lazy.train.max_iter, base_lr)
    assert lazy_lrs[19] == pytest.approx(base_lr * 0.01)  # past both steps
    assert lazy_lrs[19] == pytest.approx(0.0002)  # the value the issue measured
    assert lazy_lrs[0] == pytest.approx(base_lr * 0.1)  # warmup_factor
    # the warmup of 50/900 of the run ends at iteration 1.1
    assert lazy_lrs[1] < base_lr and lazy_lrs[2] == pytest.approx(base_lr)
    # the steps at 700/900 and 850/900 of 20 iterations
    assert lazy_lrs[15] == pytest.approx(base_lr) and lazy_lrs[16] == pytest.approx(base_lr * 0.1)
    assert lazy_lrs[18] == pytest.approx(base_lr * 0.1) and lazy_lrs[19] == pytest.approx(base_lr * 0.01)

    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, "trees", "gfl_lite0_trees.yaml"))
    cfg.SOLVER.MAX_ITER = 20
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer)
    yaml_lrs = []
    for _ in range(20):
        yaml_lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert all(b > a for a, b in zip(yaml_lrs, yaml_lrs[1:]))  # still warming up at 20
    assert yaml_lrs[19] < cfg.SOLVER.BASE_LR


def test_documented_shortened_schedule_keeps_steps_in_iterations():
    """The command of docs/detectron2_versions.md that shortens a LazyConfig run: its steps are
    at the iterations it names."""
    import shlex

    with open(os.path.join(REPO_ROOT, "docs", "detectron2_versions.md")) as f:
        text = f.read()
    block = text.split("To shorten a\nLazyConfig run")[1].split("```bash\n")[1].split("```")[0]
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == [".venv/bin/python", "lazyconfig_train_net.py"]
    config = argv[argv.index("--config-file") + 1]
    overrides = argv[argv.index("--config-file") + 2:]
    lazy = LazyConfig.apply_overrides(LazyConfig.load(os.path.join(REPO_ROOT, config)), overrides)
    base_lr = lazy.optimizer.lr
    lrs = _lrs(instantiate(lazy.lr_multiplier), lazy.train.max_iter, base_lr)
    assert len(lrs) == 300
    assert lrs[219] == pytest.approx(base_lr) and lrs[220] == pytest.approx(base_lr * 0.1)
    assert lrs[279] == pytest.approx(base_lr * 0.1) and lrs[280] == pytest.approx(base_lr * 0.01)


def test_ci_runs_the_whole_suite_under_the_simulation():
    with open(os.path.join(REPO_ROOT, ".ci", "run")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    assert 'GFOCAL_SIMULATE_UPSTREAM_NO_OPS=1 .venv/bin/python -m pytest -q -m "not trains_in_subprocess"' in lines


def test_only_tests_that_train_in_a_child_process_leave_the_simulated_pass():
    """The simulated pass leaves out exactly the tests whose training runs in a child process
    (unsimulated there): each test file that starts a training script in a subprocess marks
    those tests, and no other file uses the marker."""
    import re

    tests_dir = os.path.join(REPO_ROOT, "tests")
    for name in sorted(os.listdir(tests_dir)):
        if not name.startswith("test_") or not name.endswith(".py"):
            continue
        source = open(os.path.join(tests_dir, name)).read()
        starts_training = re.search(r"(train_net|main_job)\.py", source) and "subprocess.run" in source
        marked = "@pytest.mark.trains_in_subprocess" in source
        assert bool(starts_training) == marked or name == "test_docs.py", name


@pytest.mark.skipif(os.environ.get("GFOCAL_SIMULATE_UPSTREAM_NO_OPS") != "1",
                    reason="checks the upstream simulation (GFOCAL_SIMULATE_UPSTREAM_NO_OPS=1)")
def test_the_simulation_is_active():
    import detectron2.engine.defaults
    import detectron2.solver
    from conftest import upstream_build_optimizer

    assert detectron2.solver.build_optimizer is upstream_build_optimizer
    assert detectron2.engine.defaults.build_optimizer is upstream_build_optimizer
    with pytest.raises(ImportError):
        import detectron2.model_zoo  # noqa: F401
    from detectron2.layers import DeformConv

    with pytest.raises(ImportError, match="detectron2._C"):
        DeformConv(1, 1, 1)
