"""The user documentation holds: every relative link of README.md and docs/ resolves (files and
``#anchors``), every command the README shows parses with its script's own argument parser (and
config overrides with the config). The blocks themselves run in test_docs_run.py; the FAQ's
onnxruntime recipe in test_export_recipe.py."""

import importlib.util
import os
import re
import shlex
import sys
from typing import Dict, List, Tuple

import pytest

from conftest import REPO_ROOT

DOCS = [os.path.join(REPO_ROOT, "README.md")] + sorted(
    os.path.join(REPO_ROOT, "docs", f)
    for f in os.listdir(os.path.join(REPO_ROOT, "docs"))
    if f.endswith(".md")
)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _rel(path: str) -> str:
    return os.path.relpath(path, REPO_ROOT)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation but ``-`` and ``_``
    removed, spaces to ``-``."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set:
    found, counts = set(), {}
    in_code = False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = github_anchor(line.lstrip("#"))
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(path: str) -> List[str]:
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # no links inside code blocks
    return LINK.findall(text)


def test_github_anchor_rule():
    assert github_anchor(" The paper's ablation (Table 3) on this data\n") == "the-papers-ablation-table-3-on-this-data"
    assert github_anchor("`MODEL.GFL.REG_MAX` and levels") == "modelgflreg_max-and-levels"


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_relative_links_resolve(path):
    broken = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(dest):
            broken.append(f"{target}: no file {_rel(dest)}")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {_rel(dest)}")
    assert not broken, f"{_rel(path)}: broken links:\n  " + "\n  ".join(broken)


def test_no_reference_outside_the_repository():
    for path in DOCS:
        text = open(path, encoding="utf-8").read()
        assert "../shared" not in text and "/work/" not in text, _rel(path)


def readme_commands() -> List[Tuple[str, List[str]]]:
    """(script, argv) of each ``.venv/bin/python SCRIPT ...`` line in the README's bash blocks
    (continuation lines joined, comments and ``&&`` chains split)."""
    text = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part.strip()) if part.strip() else []
                if len(words) >= 2 and words[0].endswith("python") and words[1].endswith(".py"):
                    commands.append((words[1], words[2:]))
    return commands


def _load(script: str):
    path = os.path.join(REPO_ROOT, script)
    spec = importlib.util.spec_from_file_location("readme_" + re.sub(r"\W", "_", script), path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def test_readme_shows_commands():
    scripts = {s for s, _ in readme_commands()}
    assert {"tools/main_job.py", "train_net.py"} <= scripts, scripts


@pytest.mark.parametrize("script,argv", readme_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60])
def test_readme_command_parses(script, argv):
    """Each README command's flags parse with the script's parser; for the training scripts the
    config file loads and the trailing KEY VALUE overrides merge into it."""
    assert os.path.isfile(os.path.join(REPO_ROOT, script)), f"README names a missing script {script}"
    module = _load(script)
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        if script == "train_net.py":
            from gfocal.config import load_config

            args = _d2_args(argv)
            load_config(args.config_file, args.opts)
        elif script == "lazyconfig_train_net.py":
            from gfocal.config import load_lazy_config

            args = _d2_args(argv)
            load_lazy_config(args.config_file, args.opts)
        elif hasattr(module, "parse_args"):
            module.parse_args(argv)
        elif hasattr(module, "get_parser"):
            module.get_parser().parse_args(argv)
        else:
            pytest.fail(f"{script} has no parse_args(argv) or get_parser(): cannot check the README's command")
    finally:
        os.chdir(cwd)


def _d2_args(argv):
    """The training scripts' parser: detectron2's, with the ``--dataset`` flags."""
    from detectron2.engine import default_argument_parser

    from gfocal.data.register import add_dataset_arguments

    return add_dataset_arguments(default_argument_parser()).parse_args(argv)
