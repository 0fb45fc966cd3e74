"""docs/config_reference.md's layout table lists every module of the package, one line each, and
names no module that does not exist."""
import os
import re

from conftest import REPO_ROOT

PACKAGE_PARENT = os.path.join(REPO_ROOT, "projects", "GFocal")


def _modules() -> set:
    found = set()
    for folder, _, files in os.walk(os.path.join(PACKAGE_PARENT, "gfocal")):
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), PACKAGE_PARENT)
            if name.endswith(".py") and (name != "__init__.py" or path == "gfocal/__init__.py"):
                found.add(path.replace(os.sep, "/"))
    return found


def _table_rows() -> list:
    text = open(os.path.join(REPO_ROOT, "docs", "config_reference.md")).read()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)


def test_layout_table_lists_every_module_once():
    rows = _table_rows()
    listed = [r for r in rows if r.startswith("gfocal/")]
    assert len(listed) == len(set(listed)), [r for r in listed if listed.count(r) > 1]
    modules = _modules()
    assert len(modules) > 40
    assert sorted(modules - set(listed)) == [], "modules missing from the layout table"
    assert sorted(set(listed) - modules) == [], "the layout table names modules that do not exist"
    for other in set(rows) - set(listed):
        assert os.path.exists(os.path.join(REPO_ROOT, other.rstrip("/"))), other
