#!/usr/bin/env bash
# Set up everything the project needs, idempotently: a virtual environment in .venv (ignored by
# git) with the versions pinned in requirements.txt, detectron2 (0.6 from PyPI's pb1-detectron2
# sdist, patched by tools/install_detectron2.py, unless detectron2 is already importable) and this
# package installed in editable mode.
#
#   GFOCAL_PYTHON=/path/to/python  use that interpreter's environment instead of creating .venv
#                                  (e.g. one where detectron2 was built from source). There, only
#                                  what is missing or older than requirements.txt's pin is
#                                  installed (as a range: >=pin,<next major), nothing is ever
#                                  downgraded (pip gets every installed version as a lower bound),
#                                  torch, torchvision and detectron2 already there are kept, and
#                                  each change is printed (tools/plan_requirements.py).
#   GFOCAL_SETUP_DRY_RUN=1         with GFOCAL_PYTHON: print that plan, install nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${GFOCAL_SETUP_DRY_RUN:-}" ] && [ -z "${GFOCAL_PYTHON:-}" ]; then
  echo "[setup] GFOCAL_SETUP_DRY_RUN plans an install into GFOCAL_PYTHON's environment; .venv always gets requirements.txt's exact pins" >&2
  exit 2
fi

if [ -n "${GFOCAL_PYTHON:-}" ]; then
  PY="$GFOCAL_PYTHON"
else
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  PY=.venv/bin/python
fi

stamp_dir="$("$PY" -c 'import sys; print(sys.prefix)')"
stamp="$stamp_dir/.gfocal-requirements.sha256"
want="$(sha256sum requirements.txt tools/install_detectron2.py setup.cfg | sha256sum | cut -d' ' -f1)"
if [ -z "${GFOCAL_SETUP_DRY_RUN:-}" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import gfocal, detectron2" 2>/dev/null; then
  echo "[setup] environment is up to date ($PY)"
  exit 0
fi

if [ -n "${GFOCAL_PYTHON:-}" ]; then
  # The user's environment: install only what is missing or too old, never downgrade, say what.
  plan="$(mktemp -d)"
  keep=()
  if "$PY" -c "import torch, torchvision" 2>/dev/null; then
    keep=(torch torchvision)  # the user's own build (detectron2 is built against them)
  fi
  "$PY" tools/plan_requirements.py plan requirements.txt --out "$plan" --keep ${keep[@]+"${keep[@]}"}
  if [ -n "${GFOCAL_SETUP_DRY_RUN:-}" ]; then
    if ! "$PY" -c "import detectron2" 2>/dev/null; then
      echo "[setup] install detectron2 0.6 without its C++ ops (tools/install_detectron2.py)"
    fi
    echo "[setup] install gfocal in editable mode (--no-deps)"
    echo "[setup] dry run (GFOCAL_SETUP_DRY_RUN): nothing installed"
    exit 0
  fi
  if [ -s "$plan/install.txt" ]; then
    "$PY" -m pip install -q -c "$plan/constraints.txt" -r "$plan/install.txt"
  fi
  if [ -s "$plan/install-nodeps.txt" ]; then
    "$PY" -m pip install -q --no-deps -c "$plan/constraints.txt" -r "$plan/install-nodeps.txt"
  fi
else
  # Lines of requirements.txt marked "# --no-deps" are installed without their dependencies.
  reqs="$(mktemp)"
  nodeps="$(mktemp)"
  grep -v -- '# --no-deps' requirements.txt > "$reqs"
  grep -- '# --no-deps' requirements.txt | sed 's/#.*//' > "$nodeps"
  echo "[setup] installing pinned requirements into $PY"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -r "$reqs"
  "$PY" -m pip install -q --no-deps -r "$nodeps"
fi

if "$PY" -c "import detectron2" 2>/dev/null; then
  # Upstream main also reports version 0.6: say where it is and, for a git checkout, its commit.
  d2_dir="$("$PY" -c 'import detectron2, os; print(os.path.dirname(os.path.dirname(os.path.abspath(detectron2.__file__))))')"
  d2_version="$("$PY" -c 'import detectron2; print(detectron2.__version__)')"
  d2_commit="$(git -C "$d2_dir" rev-parse --short HEAD 2>/dev/null || true)"
  if [ -n "$d2_commit" ] && [ "$(git -C "$d2_dir" rev-parse --show-toplevel 2>/dev/null)" = "$d2_dir" ]; then
    echo "[setup] using the installed detectron2 $d2_version from $d2_dir (git checkout, commit $d2_commit)"
  else
    echo "[setup] using the installed detectron2 $d2_version from $d2_dir (not a git checkout)"
  fi
else
  echo "[setup] installing detectron2 0.6 without its C++ ops"
  "$PY" tools/install_detectron2.py
fi

"$PY" -m pip install -q --no-deps --no-build-isolation -e .
if [ -n "${GFOCAL_PYTHON:-}" ]; then
  "$PY" tools/plan_requirements.py diff "$plan/installed.json"
fi
"$PY" -c "import gfocal, detectron2; print('[setup] gfocal ready with detectron2', detectron2.__version__)"
echo "$want" > "$stamp"
