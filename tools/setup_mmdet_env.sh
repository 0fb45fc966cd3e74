#!/usr/bin/env bash
# Optional environment with mmdetection 3.x beside this project, for tests/test_mmdet_parity.py:
# a venv in .venv-mmdet (ignored by git) that sees the packages of the main environment (.venv,
# set up by tools/setup_env.sh) through a .pth file, plus the versions pinned in
# requirements-mmdet.txt installed into it with --no-deps. The main environment is not changed.
#
#   GFOCAL_MMDET_VENV=/path   where to create it (default .venv-mmdet)
#   GFOCAL_PYTHON=/path/to/python  the main environment's interpreter (default .venv/bin/python)
#
# Then: .venv-mmdet/bin/python -m pytest -q tests/test_mmdet_parity.py
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_PY="${GFOCAL_PYTHON:-.venv/bin/python}"
VENV="${GFOCAL_MMDET_VENV:-.venv-mmdet}"
if ! "$BASE_PY" -c "import gfocal, detectron2" 2>/dev/null; then
  echo "[setup-mmdet] $BASE_PY cannot import gfocal and detectron2: run tools/setup_env.sh first" >&2
  exit 1
fi

stamp="$VENV/.gfocal-mmdet-requirements.sha256"
want="$(sha256sum requirements-mmdet.txt | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && "$VENV/bin/python" -c "import mmdet, mmcv, mmengine, gfocal" 2>/dev/null; then
  echo "[setup-mmdet] environment is up to date ($VENV)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$BASE_PY" -m venv "$VENV"
fi
base_site="$("$BASE_PY" -c 'import site; print(site.getsitepackages()[0])')"
own_site="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
# addsitedir (not a plain path line) so that the main environment's own .pth files (the editable
# gfocal install) are processed too.
echo "import site; site.addsitedir('$(realpath "$base_site")')" > "$own_site/gfocal_main_env.pth"

echo "[setup-mmdet] installing requirements-mmdet.txt into $VENV"
"$VENV/bin/python" -m pip install -q --no-deps -r requirements-mmdet.txt
"$VENV/bin/python" -c "import mmdet, mmcv, mmengine, gfocal, detectron2; print('[setup-mmdet] mmdet', mmdet.__version__, 'with detectron2', detectron2.__version__)"
echo "$want" > "$stamp"
