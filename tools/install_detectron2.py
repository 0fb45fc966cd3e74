#!/usr/bin/env python
"""Install detectron2 v0.6 (pure Python, without its C++/CUDA ops) into the running interpreter.

Detectron2 is not published on PyPI under its own name. ``pb1-detectron2==0.6`` is a republication
of the official v0.6 release whose sdist lacks ``detectron2/layers/csrc``. This script downloads that
sdist from the configured package index, verifies its sha256, applies the minimal compatibility
changes below (each must apply exactly, or the script stops) and installs it with ``--no-deps``
(the runtime dependencies are pinned in ``requirements.txt``).

Changes, all needed for torch 2.14 / numpy 2 / Pillow >= 10 / no compiled ops:

1. ``setup.py``: build no extension (``ext_modules=[]``).
2. ``from detectron2 import _C`` guarded in the four modules that import it at module level, so that
   ``import detectron2.layers`` works without the ops. What needs the ops then fails when called:
   deformable convolution (``DCNv2`` configs), rotated boxes, and the fast COCO evaluation
   (``COCOEvaluator(use_fast_impl=False)`` works).
3. ``Image.LINEAR`` -> ``Image.BILINEAR`` (removed in Pillow 10).
4. ``np.int`` / ``np.float`` / ``np.str`` -> builtins (removed in NumPy 1.24).
5. Model-zoo configs moved to the top-level ``configs/`` folder that ``setup.py`` packages.
6. RetinaNet probes the head's norm type with ``get_norm(norm, 32)`` instead of 1 channel, as
   upstream main does (``GroupNorm(32, 1)`` is refused by current torch).

Users who built detectron2 from source keep theirs: ``tools/setup_env.sh`` runs this script only
when ``import detectron2`` fails.
"""
import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

GUARDED_C_IMPORT = (
    "try:\n"
    "    from detectron2 import _C\n"
    "except ImportError:  # built without its C++/CUDA ops (gfocal tools/install_detectron2.py)\n"
    "    _C = None\n"
)


def _index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL")
    if url:
        return url.rstrip("/")
    from pip._internal.models.index import PyPI

    return PyPI.simple_url.rstrip("/")


def download_sdist(dest: Path) -> Path:
    """Find the sdist on the package index's simple page, download it and check its sha256."""
    page_url = f"{_index_url()}/pb1-detectron2/"
    html = urllib.request.urlopen(page_url, timeout=120).read().decode()
    match = re.search(r'href="([^"#]*' + re.escape(SDIST_NAME) + r')(#[^"]*)?"', html)
    if match is None:
        raise SystemExit(f"{SDIST_NAME} not listed on {page_url}")
    link = match.group(1)
    if not link.startswith("http"):
        link = urllib.parse.urljoin(page_url, link)
    data = urllib.request.urlopen(link, timeout=300).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"sha256 of {SDIST_NAME} is {digest}, expected {SDIST_SHA256}")
    path = dest / SDIST_NAME
    path.write_bytes(data)
    return path


def _replace(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    found = text.count(old)
    if found != count:
        raise SystemExit(f"patch of {path}: expected {count} occurrence(s) of {old!r}, found {found}")
    path.write_text(text.replace(old, new))


def patch_source(src: Path) -> None:
    d2 = src / "detectron2"
    _replace(src / "setup.py", "ext_modules=get_extensions(),", "ext_modules=[],")
    for rel in (
        "layers/deform_conv.py",
        "layers/rotated_boxes.py",
        "layers/roi_align_rotated.py",
        "evaluation/fast_eval_api.py",
    ):
        _replace(d2 / rel, "from detectron2 import _C\n", GUARDED_C_IMPORT)
    _replace(d2 / "data/transforms/transform.py", "Image.LINEAR", "Image.BILINEAR")
    removed_aliases = re.compile(r"\bnp\.(int|float|str)\b(?![\w.])")
    for rel in ("data/build.py", "evaluation/sem_seg_evaluation.py", "data/datasets/pascal_voc.py"):
        path = d2 / rel
        text, n = removed_aliases.subn(lambda m: m.group(1), path.read_text())
        if n == 0:
            raise SystemExit(f"patch of {path}: no removed NumPy alias found")
        path.write_text(text)
    _replace(
        d2 / "modeling/meta_arch/retinanet.py",
        "str(type(get_norm(norm, 1)))",
        "str(type(get_norm(norm, 32)))",
    )
    zoo_configs = d2 / "model_zoo" / "configs"
    if zoo_configs.is_dir() and not (src / "configs").exists():
        shutil.move(str(zoo_configs), str(src / "configs"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdist", help="use this local pb1-detectron2-0.6.tar.gz instead of downloading")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        sdist = Path(args.sdist) if args.sdist else download_sdist(tmp_path)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp_path, filter="data")
        src = tmp_path / "pb1-detectron2-0.6"
        patch_source(src)
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(src)]
        )
    # Not detectron2.model_zoo: it imports pkg_resources, which setuptools >= 81 no longer has, and
    # the project does not use it.
    subprocess.check_call([sys.executable, "-c", "import detectron2.modeling, detectron2.engine"])


if __name__ == "__main__":
    main()
