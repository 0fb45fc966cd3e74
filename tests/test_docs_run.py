"""Executed docs: every ```bash and ```python block of README.md and docs/*.md runs, or carries a
visible marker that says why it cannot run here.

- Markers, on the line just before the block: ``*Not run by the docs test: needs ...*`` (the
  reason names what this machine cannot have: GPUs, COCO, a download or network, your own
  environment), or ``*Run by `tests/test_x.py` ...*`` (a test that runs the block with
  arguments it needs).
- The other blocks run, in document order, in one workspace (a folder with the repository's
  files linked in, small input files named as the docs name them, and ``output/``), through the
  smoke mode of ``tests/docs_smoke.py``: its ``.venv/bin/python`` appends or replaces arguments so
  that training runs 2 iterations at 128 px, sweeps (swept flags, ``for`` loops) run their
  first value and benchmarks one small round. A block passes when it exits 0 and every ``output/...`` path it names exists
  afterwards (plus the files listed in ``WRITES`` for the commands whose docs list their
  outputs).
- Python blocks run with ``bgr_image`` (an (H, W, 3) uint8 BGR image) and ``cfg`` (the tree
  config) defined, the names the docs use for "your image" and "a yacs GFL config".
- A command line (bash, without ``$``) that a block it depends on already ran is not run again.
- Blocks run three at a time (``GFOCAL_DOCS_JOBS``), each command with one thread
  (``GFOCAL_DOCS_THREADS``: OMP / MKL threads; on 2 cores, three one-thread jobs keep both busy
  through the single-threaded imports without two multi-threaded ones spinning against each
  other), each block after the blocks it depends on: every earlier block (of any document) that
  writes an ``output/`` path it names or names a path it writes
  (``block_writes``: the ``--output`` / ``--output-dir`` / ``OUTPUT_DIR`` it passes, else the
  script's or the config's default; a Python block writes every path it names). The README's
  first block (the main job) is waited for by every block that repeats one of its commands, names
  its model (``model_final.pth``) or its output, and by every Python block.
"""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Dict, List, Optional, Set

import pytest

from conftest import REPO_ROOT

DOCS = [os.path.join(REPO_ROOT, "README.md")] + sorted(
    glob.glob(os.path.join(REPO_ROOT, "docs", "*.md"))
)
NOT_RUN = re.compile(r"^\*Not run by the docs test: (?P<reason>.+)\*$")
RUN_BY = re.compile(r"^\*Run by `(?P<path>[^`]+)`.*\*$")
# What a "not run" marker may give as its reason: what this machine cannot have.
NOT_RUN_REASONS = ("GPU", "COCO", "download", "network", "your own")
# Files a command's docs say it writes (beyond the output/ paths the block names itself).
WRITES = {
    "tools/main_job.py": ["output/main_job/train/model_final.pth", "output/main_job/train/metrics.json",
                          "output/main_job/summary.json", "output/main_job/vis/*.png"],
    "tools/predict.py --config-file configs/trees/gfl_lite0_trees.yaml \\\n    --weights output/main_job":
        ["output/predict/detections.csv", "output/predict/coco_results.json",
         "output/predict/coco_images.json", "output/predict/orthomosaic.geojson",
         "output/predict/*_drawing.png"],
    "--format onnx \\\n    --output output/export": ["output/export/model.onnx", "output/export/model.json"],
    "--output output/analysis/mine": ["output/analysis/mine/report.json",
                                      "output/analysis/mine/distances.png"],
}
PYTHON_PRELUDE = """\
import cv2
from detectron2.config import get_cfg
from gfocal import add_gfl_config
bgr_image = cv2.imread("photo.jpg")
cfg = get_cfg()
add_gfl_config(cfg)
cfg.merge_from_file("configs/trees/gfl_lite0_trees.yaml")
"""
LINKED = ("configs", "tools", "benchmarks", "projects", "notebooks", "tests", "docs", "README.md",
          "train_net.py", "lazyconfig_train_net.py", "requirements.txt", "requirements-mmdet.txt",
          "setup.cfg", "pyproject.toml", ".git")


@dataclass
class Block:
    path: str
    line: int
    lang: str
    code: str
    marker: str  # the marker line, or ""

    @property
    def id(self) -> str:
        return f"{os.path.relpath(self.path, REPO_ROOT)}:{self.line}"


def doc_blocks(path: str) -> List[Block]:
    text = open(path, encoding="utf-8").read()
    found = []
    for m in re.finditer(r"^( *)```(bash|python)\n(.*?)^ *```", text, flags=re.S | re.M):
        before = [line.strip() for line in text[: m.start()].splitlines() if line.strip()]
        marker = before[-1] if before and (NOT_RUN.match(before[-1]) or RUN_BY.match(before[-1])) else ""
        code = textwrap.dedent(m.group(3))
        found.append(Block(path, text[: m.start()].count("\n") + 1, m.group(2), code, marker))
    return found


ALL_BLOCKS = [b for path in DOCS for b in doc_blocks(path)]
RUN_BLOCKS = [b for b in ALL_BLOCKS if not b.marker]


def test_every_block_is_run_or_marked_with_a_reason():
    assert len(ALL_BLOCKS) > 40 and len(RUN_BLOCKS) > 25, (len(ALL_BLOCKS), len(RUN_BLOCKS))
    bad = []
    for b in ALL_BLOCKS:
        not_run, run_by = NOT_RUN.match(b.marker), RUN_BY.match(b.marker)
        if not_run and not any(r in not_run.group("reason") for r in NOT_RUN_REASONS):
            bad.append(f"{b.id}: a 'not run' reason names none of {NOT_RUN_REASONS}: {b.marker}")
        if run_by and not os.path.isfile(os.path.join(REPO_ROOT, run_by.group("path").split("::")[0])):
            bad.append(f"{b.id}: {b.marker} names no file of the repository")
    assert not bad, "\n".join(bad)


def test_marker_rule_recognises_both_markers():
    assert NOT_RUN.match("*Not run by the docs test: needs COCO and 8 GPUs.*")
    assert RUN_BY.match("*Run by `tests/test_export.py` with a model and an image.*")
    assert not NOT_RUN.match("Not run: needs COCO")  # must be the visible italic line


def test_smoke_rules_rewrite_as_documented():
    from docs_smoke import smoke_argv

    argv = smoke_argv("tools/run_ablation.py", ["--lrs", "0.01", "0.02", "--seeds", "0", "1", "2",
                                                "SOLVER.MAX_ITER", "300"])
    assert argv[:4] == ["--variants", "gfl", "--threads", "1"]
    assert argv[4:8] == ["--lrs", "0.01", "--seeds", "0"] and argv[8:10] == ["SOLVER.MAX_ITER", "300"]
    assert argv[argv.index("SOLVER.MAX_ITER", 9) + 1] == "2"  # appended after: the smoke value wins
    bench = smoke_argv("benchmarks/backbone_variants.py", ["--threads", "2", "--repeats", "20"])
    assert bench[bench.index("--threads") + 1] == "1" and bench.count("--threads") == 1
    train = smoke_argv("train_net.py", ["--config-file", "c.yaml", "MODEL.WEIGHTS", "w.pth"])
    assert train.count("MODEL.WEIGHTS") == 1
    assert smoke_argv("train_net.py", ["--config-file", "c.yaml"])[-2:] == ["MODEL.WEIGHTS", ""]
    assert smoke_argv("tools/unknown.py", ["--x", "1"]) == ["--x", "1"]
    assert _FOR_LOOP.sub(r"\1\2\3", "for seed in 0 1 2; do  # 3 seeds") == "for seed in 0; do  # 3 seeds"


def test_blocks_that_share_outputs_are_ordered():
    """The schedule's dependencies: read after write (in a document or across documents),
    a config's default OUTPUT_DIR as a write, commands of the first block skipped."""
    def block(path, code, lang="bash"):
        return Block(os.path.join(REPO_ROOT, path), 1, lang, code, "")

    blocks = [
        block("README.md", ".venv/bin/python tools/main_job.py  # the main job\n"),
        block("docs/a.md", ".venv/bin/python tools/yell_geotiff.py --split val --output output/a.tif\n"),
        block("docs/a.md", "ls output/main_job/train/model_final.pth\n"),
        block("docs/b.md", ".venv/bin/python tools/predict.py --weights w --output output/p output/a.tif\n"),
        block("docs/b.md", ".venv/bin/python train_net.py --config-file configs/trees/gfl_lite0_trees.yaml\n"),
        block("docs/c.md", ".venv/bin/python train_net.py --config-file configs/trees/gfl_lite0_trees.yaml "
                           "--eval-only MODEL.WEIGHTS output/main_job/train/model_final.pth\n"),
        block("docs/c.md", "bash tools/setup_env.sh && .venv/bin/python tools/main_job.py\n"),
        block("docs/d.md", "cat output/p/detections.csv\n"),
    ]
    assert block_writes(blocks[4]) == {"output/trees/gfl_lite0"}  # the config's OUTPUT_DIR
    loop = block("docs/e.md", "for N in 0 1; do x --output-dir output/s$N; done\n"
                              "y --weights output/s*/model.pth --output output/t\n")
    assert named_outputs(loop) == ["output/s*", "output/t"]  # a variable or a glob: the glob
    assert block_writes(blocks[6], {".venv/bin/python tools/main_job.py"}) == set()
    deps = dependencies(blocks)
    assert deps[1] == set()  # neither the main job's commands nor its outputs: beside it
    assert 1 not in deps[2] and 0 in deps[2]  # same document, no shared path; the main job's model
    assert 1 in deps[3]  # reads output/a.tif, which docs/a.md writes
    assert 4 in deps[5]  # both write output/trees/gfl_lite0
    assert 2 not in deps[5] and 3 not in deps[5]  # reads only, or other paths: parallel
    assert 0 in deps[6] and deps[6] <= {0, 5}  # the main job again: skipped once it ran
    assert 3 in deps[7] and 4 not in deps[7]


# ---------------------------------------------------------------------------------------------
# The workspace and the runner


def _write_fixtures(ws: str) -> None:
    """The input files the docs name: data/ (a 3-class VOC folder and a COCO JSON of deepforest's
    images; data/ortho_xml + data/ortho and data/val_xml + data/val, one VOC image each), photo.jpg, photos/, orthomosaic.tif (a GeoTIFF), the smoke tree-crown tiles."""
    import cv2

    from gfocal.data.formats import load_voc_folder
    from gfocal.data.tree_crowns import TileSpec, build_tree_crowns, deepforest_data_dir

    source = deepforest_data_dir()
    for sub in ("data/train_xml", "data/images", "data/ortho_xml", "data/ortho", "data/val_xml",
                "data/val", "photos", "output"):
        os.makedirs(os.path.join(ws, sub), exist_ok=True)
    for stem in ("OSBS_029", "SOAP_061"):
        shutil.copy(os.path.join(source, stem + ".xml"), os.path.join(ws, "data/train_xml"))
        shutil.copy(os.path.join(source, stem + ".png"), os.path.join(ws, "data/images"))
    # The "orthomosaic" VOC pair of own_data.md's tiling section (one class, the tree config's):
    # small stand-ins, one image each (OSBS_029 holds only "Tree" boxes).
    for stem, xml_dir, image_dir in (("OSBS_029", "data/ortho_xml", "data/ortho"),
                                     ("OSBS_029", "data/val_xml", "data/val")):
        shutil.copy(os.path.join(source, stem + ".xml"), os.path.join(ws, xml_dir))
        shutil.copy(os.path.join(source, stem + ".png"), os.path.join(ws, image_dir))
    records, classes = load_voc_folder(os.path.join(ws, "data/train_xml"), os.path.join(ws, "data/images"))
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    for i, r in enumerate(records):
        coco["images"].append({"id": i + 1, "file_name": os.path.basename(r["file_name"]),
                               "height": r["height"], "width": r["width"]})
        for a in r["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                        "category_id": a["category_id"] + 1, "iscrowd": 0,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    with open(os.path.join(ws, "data/val.json"), "w") as f:
        json.dump(coco, f)
    image = cv2.imread(os.path.join(source, "OSBS_029.png"))
    cv2.imwrite(os.path.join(ws, "photo.jpg"), image)
    cv2.imwrite(os.path.join(ws, "photos", "OSBS_029.jpg"), image)
    shutil.copy(os.path.join(source, "OSBS_029.tif"), os.path.join(ws, "orthomosaic.tif"))
    from docs_smoke import SMOKE_TILE_SIZE

    build_tree_crowns(root=os.path.join(ws, "datasets", "neon_trees"),
                      spec=TileSpec(tile_size=SMOKE_TILE_SIZE))


class Runner:
    def __init__(self, ws: str):
        self.ws = ws
        self.results: Dict[str, subprocess.CompletedProcess] = {}
        self._lock = threading.Lock()
        shim_dir = os.path.join(ws, ".venv", "bin")
        os.makedirs(shim_dir, exist_ok=True)
        for name in ("python", "python3"):
            shim = os.path.join(shim_dir, name)
            with open(shim, "w") as f:
                f.write(f'#!/bin/sh\nexec "{sys.executable}" "{os.path.join(REPO_ROOT, "tests", "docs_smoke.py")}" "$@"\n')
            os.chmod(shim, 0o755)
        pythonpath = os.path.join(REPO_ROOT, "projects", "GFocal")
        self.env = dict(
            os.environ,
            PATH=shim_dir + os.pathsep + os.environ.get("PATH", ""),
            GFOCAL_DOCS_REAL_PYTHON=sys.executable,
            GFOCAL_DOCS_TIMES=os.path.join(ws, "command_times.tsv"),
            OMP_NUM_THREADS=os.environ.get("GFOCAL_DOCS_THREADS", "1"),
            MKL_NUM_THREADS=os.environ.get("GFOCAL_DOCS_THREADS", "1"),
            DETECTRON2_DATASETS=os.path.join(ws, "datasets"),
            PYTHONPATH=pythonpath + os.pathsep + os.environ.get("PYTHONPATH", ""),
            PYTHONWARNINGS="ignore",
        )
        self.env.pop("GFOCAL_SIMULATE_UPSTREAM_NO_OPS", None)

    def script(self, block: Block, already_run: Set[str]) -> List[str]:
        if block.lang == "python":
            return [".venv/bin/python", "-c", PYTHON_PRELUDE + block.code]
        lines = []
        for line in block.code.replace("\\\n", " ").splitlines():
            line = _FOR_LOOP.sub(r"\1\2\3", line)  # a shell loop's sweep: its first value
            parts = []
            for part in line.split(" && "):
                command = " ".join(re.split(r"\s#", part)[0].split())
                if command and _skippable(command) and command in already_run:
                    parts.append(": " + shlex.quote(f"already run by an earlier block: {command}"))
                else:
                    parts.append(part)
            lines.append(" && ".join(parts))
        return ["bash", "-euo", "pipefail", "-c", "\n".join(lines)]

    def _run_one(self, block: Block, already_run: Set[str]) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        done = subprocess.run(self.script(block, already_run), cwd=self.ws, env=self.env,
                              capture_output=True, text=True, timeout=1200)
        # One line per block as it ends (seconds, exit status, 1-minute load), so that a run cut
        # short still says which blocks cost what: <workspace>/block_times.tsv.
        with self._lock, open(os.path.join(self.ws, "block_times.tsv"), "a") as f:
            f.write(f"{block.id}\t{time.perf_counter() - start:.1f}\t{done.returncode}\t"
                    f"{os.getloadavg()[0]:.2f}\n")
        return done

    def run_all(self, blocks: List[Block], wanted: Set[str], jobs: int) -> None:
        """Run the ``wanted`` blocks (ids) and the blocks they depend on, ``jobs`` at a time, each
        after its dependencies (``dependencies``); ``blocks[0]`` first, beside blocks that do not
        depend on it. If it fails, nothing that depends on it runs."""
        deps = dependencies(blocks)
        ancestors: List[Set[int]] = []
        for d in deps:
            ancestors.append(set(d).union(*(ancestors[i] for i in d)) if d else set())
        needed = {j for j, b in enumerate(blocks) if b.id in wanted}
        needed |= {0}.union(*(ancestors[j] for j in needed))
        ran: Dict[int, Set[str]] = {}  # the commands of each block that exited 0

        def go(j: int) -> subprocess.CompletedProcess:
            already = set().union(*(ran.get(i, set()) for i in ancestors[j] | {0}))
            done = self._run_one(blocks[j], already)
            if done.returncode == 0 and blocks[j].lang == "bash":
                ran[j] = {c for line in blocks[j].code.replace("\\\n", " ").splitlines()
                          for c in commands(line)}
            return done

        pending = sorted(needed)
        finished: Set[int] = set()
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            running = {}
            while pending or running:
                for j in [j for j in pending if (deps[j] & needed) <= finished][: jobs - len(running)]:
                    pending.remove(j)
                    running[pool.submit(go, j)] = j
                if not running:
                    break
                done_futures, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done_futures:
                    j = running.pop(future)
                    self.results[blocks[j].id] = future.result()
                    finished.add(j)
                if 0 in finished and self.results[blocks[0].id].returncode != 0:
                    # the fixture reports it; what depends on its model does not run
                    pending = [j for j in pending if 0 not in ancestors[j]]


@pytest.fixture(scope="module")
def runner(request, tmp_path_factory):
    ws = os.environ.get("GFOCAL_DOCS_WORKSPACE") or str(tmp_path_factory.mktemp("docs_workspace"))
    if os.path.isdir(ws):  # a kept workspace (GFOCAL_DOCS_WORKSPACE) starts again from nothing
        shutil.rmtree(ws)
    os.makedirs(ws)
    for name in LINKED:
        if os.path.exists(os.path.join(REPO_ROOT, name)):
            os.symlink(os.path.join(REPO_ROOT, name), os.path.join(ws, name))
    _write_fixtures(ws)
    r = Runner(ws)
    first = RUN_BLOCKS[0]  # the README's first command: the main job, whose model later blocks use
    assert "tools/main_job.py" in first.code, first.id
    # The blocks this session's tests ask for (all of them, or those -k selects), with what they
    # depend on.
    wanted = {item.callspec.params["block"].id for item in request.session.items
              if item.originalname == "test_documented_block_runs"}
    # whole_images.md's Python names the main job's model "model_final.pth" (written by `first`).
    os.symlink(os.path.join(ws, "output/main_job/train/model_final.pth"), os.path.join(ws, "model_final.pth"))
    start = time.perf_counter()
    r.run_all(RUN_BLOCKS, wanted | {first.id}, int(os.environ.get("GFOCAL_DOCS_JOBS", "3")))
    with open(os.path.join(ws, "block_times.tsv"), "a") as f:
        f.write(f"total\t{time.perf_counter() - start:.1f}\t\t{os.getloadavg()[0]:.2f}\n")
    done = r.results[first.id]
    assert done.returncode == 0, _tail(done)
    return r


def _tail(done: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-n:]}\n--- stderr\n{done.stderr[-n:]}"


def named_outputs(block: Block) -> List[str]:
    """The ``output/`` paths a block names (one built from a shell variable, ``output/s$seed``,
    or a glob, ``output/s*/model.pth``, as the glob ``output/s*``), and those its docs list
    (``WRITES``)."""
    paths = [m.group(0) + ("*" if block.code[m.end():m.end() + 1] in ("$", "*") else "")
             for m in re.finditer(r"(?<![\w/])output/[\w./-]*[\w/]", block.code)]
    for key, files in WRITES.items():
        if key in block.code:
            paths += files
    return sorted(set(paths))


# What a command writes when it is given no output flag: the script's argparse default, and for
# the training scripts the config's OUTPUT_DIR (train.output_dir of a LazyConfig).
_OUTPUT_FLAG = re.compile(r"(?:--output(?:-dir)?[ =]|OUTPUT_DIR |train\.output_dir=)\s*['\"]?([\w./$-]+)")
_SCRIPT = re.compile(r"(?:^|\s)(?:\S*python3?\s+)([\w./-]+\.py)\b")
_TRAINING = ("train_net.py", "lazyconfig_train_net.py")


def _norm(path: str) -> str:
    """``path`` without ``./`` and trailing ``/``; a path built from a shell variable or a glob
    (``output/s$seed``) as the folder it lies in (``output``)."""
    if "$" in path or "*" in path:
        path = os.path.dirname(re.split(r"[$*]", path)[0])
    while path.startswith("./"):
        path = path[2:]
    return path.rstrip("/")


def _default_output(script: str, command: str) -> Optional[str]:
    """Where ``script`` writes when ``command`` passes no output flag (None: nowhere we know)."""
    source = os.path.join(REPO_ROOT, script)
    if os.path.basename(script) in _TRAINING:
        m = re.search(r"--config-file[ =](\S+)", command)
        return _config_output_dir(m.group(1)) if m else "output"
    if not os.path.isfile(source):
        return None
    m = re.search(r'add_argument\("--output(?:-dir)?", default=(?:os\.path\.join\(REPO, )?"([^"]+)"',
                  open(source, encoding="utf-8").read())
    return _norm(m.group(1)) if m else None


def _config_output_dir(config: str) -> str:
    """A config's OUTPUT_DIR (following ``_BASE_``), detectron2's ``./output`` if none."""
    if _norm(config).startswith("output/"):  # a run's config.yaml, dumped into its OUTPUT_DIR
        return os.path.dirname(_norm(config))
    path = os.path.join(REPO_ROOT, config)
    if not os.path.isfile(path):
        return "output"
    text = open(path, encoding="utf-8").read()
    m = re.search(r'^(?:OUTPUT_DIR:|train\.output_dir =)\s*"([^"]+)"', text, flags=re.M)
    if m:
        return _norm(m.group(1))
    base = re.search(r'^_BASE_:\s*"([^"]+)"', text, flags=re.M)
    if base:
        return _config_output_dir(os.path.join(os.path.dirname(config), base.group(1)))
    return "output"


# ``for VAR in A B C; do``: smoke mode keeps the first value, as it does for swept flags.
_FOR_LOOP = re.compile(r"^(\s*for \w+ in )(\S+)(?: [^;]+)?(; do\b)")


def commands(line: str) -> List[str]:
    """The commands of one shell line (continuations joined), split at ``&&``, without the
    comment, whitespace collapsed: the unit a block's ``already run`` rule compares."""
    line = re.split(r"\s#", line)[0]
    return [" ".join(part.split()) for part in line.split(" && ") if part.strip()]


def _skippable(command: str) -> bool:
    """A command the ``already run`` rule may skip: a script run, without shell variables (not
    ``done`` or ``fi``, whose removal would break the shell syntax)."""
    return "$" not in command and ("python" in command or command.startswith("bash "))


def block_writes(block: Block, already_run: Set[str] = frozenset()) -> Set[str]:
    """The ``output/`` paths a block writes, less its commands in ``already_run`` (a superset is
    safe: it only orders more blocks)."""
    if block.lang == "python":
        return set(map(_norm, named_outputs(block)))
    written = set()
    for line in block.code.replace("\\\n", " ").splitlines():
        for command in commands(line):
            if command in already_run:
                continue
            if " -c " in command:  # inline Python: anything it names
                written.update(_norm(p) for p in re.findall(r"(?<![\w/])output/[\w./-]*[\w/]", command))
                continue
            flags = [_norm(p) for p in _OUTPUT_FLAG.findall(command)]
            written.update(p for p in flags if p.startswith("output"))
            if not flags:
                for script in _SCRIPT.findall(command):
                    default = _default_output(script, command)
                    if default:
                        written.add(default)
    return written


def _needs_first(block: Block, first: Set[str]) -> bool:
    """Whether ``block`` waits for the main job (``blocks[0]``): it repeats one of its commands
    (skipped as already run), names its model or output, or is Python (which may load either)."""
    if block.lang == "python" or "model_final.pth" in block.code or "main_job" in block.code:
        return True
    return any(c in first for line in block.code.replace("\\\n", " ").splitlines()
               for c in commands(line))


def _related(a: Set[str], b: Set[str]) -> bool:
    """Some path of ``a`` is one of ``b`` or a folder above or below one."""
    return any(x == y or x.startswith(y + "/") or y.startswith(x + "/") for x in a for y in b)


def dependencies(blocks: List[Block]) -> List[Set[int]]:
    """For each block, the indices of the earlier blocks it must wait for: every earlier block
    (of its document or another) whose writes meet its paths or whose paths meet its
    writes (read after write, write after read, write after write), and ``blocks[0]`` where
    ``_needs_first``; its commands, skipped wherever they come again, write nothing later."""
    first = {c for line in blocks[0].code.replace("\\\n", " ").splitlines() for c in commands(line)}
    writes = [block_writes(blocks[0])] + [block_writes(b, first) for b in blocks[1:]]
    names = [set(map(_norm, named_outputs(b))) | w for b, w in zip(blocks, writes)]
    deps: List[Set[int]] = []
    for j, b in enumerate(blocks):
        d = {i for i in range(j) if _related(writes[i], names[j]) or _related(names[i], writes[j])}
        if j and _needs_first(b, first):
            d.add(0)
        deps.append(d)
    return deps


# Time: the whole run (59 blocks) took 7 min 21 s on the 2-core project machine (AMD EPYC, quiet:
# the run itself only, 1-minute load 0.45 before); docs/detectron2_versions.md ("What CI checks") has the figure's command.


@pytest.mark.trains_in_subprocess
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: b.id)
def test_documented_block_runs(block: Block, runner: Runner):
    """The block exits 0 in smoke mode and every output path it names (or its docs list) exists."""
    done = runner.results[block.id]
    assert done.returncode == 0, f"{block.id}:\n{block.code}\n{_tail(done)}"
    missing = [p for p in named_outputs(block) if not glob.glob(os.path.join(runner.ws, p))]
    assert not missing, f"{block.id} ran but did not write {missing}\n{_tail(done)}"
