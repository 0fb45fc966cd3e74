"""Traceable numbers: every measured figure of README.md and docs/*.md sits in a section that
holds the command that produces it.

The rule, kept simple on purpose:

- A *section* runs from a markdown heading to the next heading (the text before the first heading
  is a section too).
- A *figure* is a number with a unit of measurement (``12 s``, ``188 ms``, ``6 min``, ``2.15x``,
  ``48.6%``, ``14.6 AP``, ``512 MB``, ``10 FPS``; ``UNIT`` below), or a table row with a decimal
  number (``| ... | 16.3 | ...``), outside code blocks and inline code.
- A section *has a command* when it holds a fenced code block, or inline code that runs
  something: ```python ...```, ```.venv/bin/python ...```, ```benchmarks/...```, ```tools/...```
  (``COMMAND`` below).
- A figure whose line says where it comes from elsewhere (the word ``paper`` or ``reported``:
  the GFL papers' or mmdetection's published numbers) is not ours to reproduce and is exempt.

The test lists ``file:line: text`` of each figure in a section without a command.
"""
import glob
import os
import re
from typing import List, Tuple

from conftest import REPO_ROOT

DOCS = [os.path.join(REPO_ROOT, "README.md")] + sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))
UNIT = re.compile(
    r"(?<![\w.])\d+(?:\.\d+)?(?:\s?(?:ms|min|s|x|%|AP|MB|GB|MiB|GiB|FPS)|x)(?![\w/])"
)
TABLE_DECIMAL = re.compile(r"\|\s*[-+±~]?\d+\.\d+(?![\w.])")  # a table cell that starts with a decimal
COMMAND = re.compile(r"`(?:python3? |\.venv/bin/python |benchmarks/|tools/)[^`]*`")
EXEMPT = re.compile(r"\b(paper|papers|paper's|reported)\b", re.I)
HEADING = re.compile(r"^#{1,6} ")


def sections(path: str) -> List[Tuple[int, List[Tuple[int, str]], bool]]:
    """(heading line, [(line number, prose text without inline code)], has a command) per
    section of ``path``."""
    found, lines, has_command, start, in_code = [], [], False, 1, False
    for number, line in enumerate(open(path, encoding="utf-8").read().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            has_command = True
            continue
        if in_code:
            continue
        if HEADING.match(line):
            found.append((start, lines, has_command))
            lines, has_command, start = [], False, number
            continue
        if COMMAND.search(line):
            has_command = True
        lines.append((number, re.sub(r"`[^`]*`", "``", line)))
    found.append((start, lines, has_command))
    return found


def untraced_figures(path: str) -> List[str]:
    bad = []
    for _, lines, has_command in sections(path):
        if has_command:
            continue
        for number, text in lines:
            if EXEMPT.search(text):
                continue
            if UNIT.search(text) or TABLE_DECIMAL.search(text):
                bad.append(f"{os.path.relpath(path, REPO_ROOT)}:{number}: {text.strip()[:120]}")
    return bad


def test_rule_finds_figures_and_commands():
    assert UNIT.search("took 6 min 1 s") and UNIT.search("2.15x eager") and UNIT.search("16.3 AP")
    assert UNIT.search("48.6% recall") and UNIT.search("188 ms")
    assert not UNIT.search("configs/gfl_R_50_FPN_1x.yaml") and not UNIT.search("P3-P7")
    assert TABLE_DECIMAL.search("| gfl | 16.3 | 48.6 |") and not TABLE_DECIMAL.search("| a | 3 |")
    assert not TABLE_DECIMAL.search("| install, detectron2 0.6 |")
    assert COMMAND.search("run `tools/main_job.py --seed 1`")
    assert COMMAND.search("`.venv/bin/python benchmarks/inference.py`")
    assert not COMMAND.search("`MODEL.GFL.REG_MAX`")
    assert EXEMPT.search("40.2 AP (the paper's Table 3)")


def test_every_measured_figure_has_its_command_in_the_section():
    bad = [b for path in DOCS for b in untraced_figures(path)]
    assert not bad, "figures without a command in their section:\n" + "\n".join(bad)
