"""tools/setup_env.sh in a user's own environment (GFOCAL_PYTHON): only what is missing or older
than the tested pin is installed, never a downgrade, each change printed
(tools/plan_requirements.py). The .venv path keeps the exact pins."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import plan_requirements as planner  # noqa: E402

# The versions a user's environment had in the issue report (all newer than requirements.txt's).
USER_ENV = {"setuptools": "84.2.1", "omegaconf": "2.3.1", "hydra-core": "1.3.8",
            "cloudpickle": "3.1.3"}


def _pins():
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        return planner.parse_requirements(f.read())


def test_requirements_txt_parses_with_no_deps_marks():
    requirements = {r.name: r for r in _pins()}
    assert requirements["omegaconf"].pin and not requirements["omegaconf"].no_deps
    assert requirements["deepforest"].no_deps
    with pytest.raises(ValueError, match="expected 'name==version'"):
        planner.parse_requirements("numpy>=2\n")


def test_plan_keeps_newer_upgrades_older_installs_missing():
    pins = {r.name: r.pin for r in _pins()}
    installed = dict(USER_ENV, numpy="1.26.4", torch="2.5.1+cu121", pillow=pins["pillow"],
                     tqdm="5.0.0")
    steps = {s.requirement.name: s for s in planner.plan(_pins(), installed, keep=["torch"])}
    for name, version in USER_ENV.items():  # never downgraded
        assert (steps[name].action, steps[name].installed) == ("keep", version), name
    assert steps["pillow"].action == "keep" and "the tested version" in steps["pillow"].note
    assert steps["tqdm"].action == "keep" and "newer major" in steps["tqdm"].note
    assert steps["torch"].action == "keep" and "older than the tested" in steps["torch"].note
    major = int(pins["numpy"].split(".")[0])
    assert steps["numpy"].action == "upgrade"
    assert steps["numpy"].spec == f"numpy>={pins['numpy']},<{major + 1}"
    assert steps["yacs"].action == "install" and steps["yacs"].spec.startswith("yacs>=")
    assert not any(s.action not in ("keep", "install", "upgrade") for s in steps.values())


def test_constraints_forbid_downgrading_anything_installed():
    lines = planner.constraints({"torch": "2.5.1+cu121", "omegaconf": "2.3.1", "odd": "not-a-version"})
    assert lines == ["omegaconf>=2.3.1", "torch>=2.5.1"]


def test_changes_report_downgrades_loudly():
    lines, downgraded = planner.changes({"a": "1.0", "b": "2.0", "c": "1.0"},
                                        {"a": "1.1", "b": "1.9", "c": "1.0", "d": "0.1"})
    assert downgraded == ["b"]
    assert lines == ["[setup] upgraded   a 1.0 -> 1.1", "[setup] DOWNGRADED b 2.0 -> 1.9",
                     "[setup] installed  d 0.1"]


def _fake_env(tmp_path, versions):
    """A throwaway venv whose only distributions are ``versions`` (metadata only) and
    ``packaging`` (the planner's version parser)."""
    env = tmp_path / "user-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True,
                   timeout=120)
    site = glob.glob(str(env / "lib" / "python*" / "site-packages"))[0]
    for name, version in versions.items():
        info = os.path.join(site, f"{name.replace('-', '_')}-{version}.dist-info")
        os.makedirs(info)
        with open(os.path.join(info, "METADATA"), "w") as f:
            f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    import packaging

    shutil.copytree(os.path.dirname(packaging.__file__), os.path.join(site, "packaging"))
    return env, site


def _snapshot(site):
    return sorted(os.listdir(site))


def test_setup_env_dry_run_in_a_user_env_downgrades_nothing(tmp_path):
    env, site = _fake_env(tmp_path, dict(USER_ENV, numpy="1.26.4"))
    before = _snapshot(site)
    run = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "tools", "setup_env.sh")],
        env=dict(os.environ, GFOCAL_PYTHON=str(env / "bin" / "python"), GFOCAL_SETUP_DRY_RUN="1"),
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for name, version in USER_ENV.items():
        assert f"[setup] keep    {name} {version}" in out, out
    assert "[setup] upgrade numpy 1.26.4 -> numpy>=" in out
    assert "[setup] install torch>=" in out and "(missing)" in out
    assert "[setup] install deepforest>=" in out and "(--no-deps)" in out
    assert "install detectron2 0.6" in out and "dry run" in out
    assert not [line for line in out.splitlines()
                if "downgrade" in line.lower() and "never downgrades" not in line]
    assert _snapshot(site) == before  # nothing installed
    assert not os.path.exists(env / ".gfocal-requirements.sha256")


def test_setup_env_dry_run_needs_gfocal_python():
    env = {k: v for k, v in os.environ.items() if k != "GFOCAL_PYTHON"}
    run = subprocess.run(["bash", os.path.join(REPO_ROOT, "tools", "setup_env.sh")],
                         env=dict(env, GFOCAL_SETUP_DRY_RUN="1"), capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and "exact pins" in run.stderr
