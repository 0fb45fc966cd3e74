#!/usr/bin/env python
"""Plan the install of requirements.txt into an existing environment (GFOCAL_PYTHON) without
downgrading anything: run by that environment's interpreter from tools/setup_env.sh.

    python tools/plan_requirements.py plan requirements.txt --out DIR [--keep torch torchvision]
    python tools/plan_requirements.py diff DIR/installed.json

``plan`` prints one line per requirement and writes into DIR:

* ``install.txt`` / ``install-nodeps.txt``: the requirements to install (those marked
  ``# --no-deps`` go to the second), each as its range (see :func:`compatible_range`);
* ``constraints.txt``: ``name>=installed version`` for every installed distribution, given to
  pip with ``-c`` so that resolving the installs cannot downgrade anything either;
* ``installed.json``: the installed versions, for ``diff``.

Per requirement ``name==pin``, with ``installed`` its installed version:

=====================================  ===========================================
installed                              action
=====================================  ===========================================
none                                   install ``name>=pin,<next major``
below ``pin``                          upgrade to ``name>=pin,<next major``
``pin`` or newer (any major)           keep (never downgraded)
a ``--keep`` name (torch, ...)         keep whatever is installed
=====================================  ===========================================

``diff`` prints what changed since ``plan`` (installed, upgraded, and any downgrade loudly).
The project's own ``.venv`` is not planned: it gets the exact pins of requirements.txt.
"""
import argparse
import json
import os
import re
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

try:
    from packaging.version import InvalidVersion, Version
except ImportError:  # every environment with pip has pip's copy
    from pip._vendor.packaging.version import InvalidVersion, Version


class Requirement(NamedTuple):
    name: str  # as written in requirements.txt
    pin: str
    no_deps: bool


class Step(NamedTuple):
    requirement: Requirement
    installed: Optional[str]
    action: str  # "install", "upgrade", "keep"
    spec: str  # what pip gets (install/upgrade), "" for keep
    note: str


def normalize(name: str) -> str:
    """PEP 503 name: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(text: str) -> List[Requirement]:
    """The ``name==version`` lines of a requirements file (``# --no-deps`` marks a line)."""
    requirements = []
    for line in text.splitlines():
        spec, _, comment = line.partition("#")
        spec = spec.strip()
        if not spec:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", spec)
        if not match:
            raise ValueError(f"requirements line {line!r}: expected 'name==version'")
        requirements.append(Requirement(match.group(1), match.group(2), "--no-deps" in comment))
    return requirements


def compatible_range(pin: str) -> str:
    """``>=pin,<next major``: the tested version or any newer one of the same major version."""
    return f">={pin},<{Version(pin).release[0] + 1}"


def installed_versions() -> Dict[str, str]:
    """Normalized name -> version of every distribution this interpreter sees."""
    from importlib import metadata

    versions = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(normalize(name), dist.version)
    return versions


def _version(text: str) -> Optional[Version]:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def plan(requirements: List[Requirement], installed: Dict[str, str], keep=()) -> List[Step]:
    """One :class:`Step` per requirement (see the module's table)."""
    keep = {normalize(k) for k in keep}
    steps = []
    for req in requirements:
        have = installed.get(normalize(req.name))
        pin = Version(req.pin)
        spec = f"{req.name}{compatible_range(req.pin)}"
        if have is None:
            steps.append(Step(req, None, "install", spec, "missing"))
            continue
        have_version = _version(have)
        if normalize(req.name) in keep:
            note = "kept as installed"
            if have_version is not None and have_version < pin:
                note += f"; older than the tested {req.pin}"
            steps.append(Step(req, have, "keep", "", note))
        elif have_version is not None and have_version < pin:
            steps.append(Step(req, have, "upgrade", spec, f"older than the tested {req.pin}"))
        else:
            note = "the tested version" if have_version == pin else f"tested {req.pin}"
            if have_version is not None and have_version.release[0] > pin.release[0]:
                note += ", a newer major version: kept"
            steps.append(Step(req, have, "keep", "", note))
    return steps


def constraints(installed: Dict[str, str]) -> List[str]:
    """``name>=version`` for each installed distribution (local labels such as +cu121 dropped:
    PEP 440 allows none in ``>=``), so that pip's resolver cannot downgrade it."""
    lines = []
    for name, version in sorted(installed.items()):
        parsed = _version(version)
        if parsed is not None:
            lines.append(f"{name}>={parsed.public}")
    return lines


def describe(step: Step) -> str:
    req = step.requirement
    flag = " (--no-deps)" if req.no_deps else ""
    if step.action == "keep":
        return f"[setup] keep    {req.name} {step.installed} ({step.note})"
    if step.action == "upgrade":
        return f"[setup] upgrade {req.name} {step.installed} -> {step.spec}{flag} ({step.note})"
    return f"[setup] install {step.spec}{flag} ({step.note})"


def changes(before: Dict[str, str], after: Dict[str, str]) -> Tuple[List[str], List[str]]:
    """(lines describing each change, the names that were downgraded)."""
    lines, downgraded = [], []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if old is None:
            lines.append(f"[setup] installed  {name} {new}")
        elif new is None:
            lines.append(f"[setup] REMOVED    {name} {old}")
        else:
            o, n = _version(old), _version(new)
            if o is not None and n is not None and n < o:
                downgraded.append(name)
                lines.append(f"[setup] DOWNGRADED {name} {old} -> {new}")
            else:
                lines.append(f"[setup] upgraded   {name} {old} -> {new}")
    return lines, downgraded


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="plan the install of a requirements file")
    p.add_argument("requirements")
    p.add_argument("--out", required=True, help="folder for the install/constraints files")
    p.add_argument("--keep", nargs="*", default=[], help="names kept at any installed version")
    d = sub.add_parser("diff", help="print what changed since 'plan'")
    d.add_argument("installed_json")
    args = parser.parse_args(argv)

    if args.command == "diff":
        with open(args.installed_json) as f:
            before = json.load(f)
        lines, downgraded = changes(before, installed_versions())
        print("\n".join(lines) if lines else "[setup] no package changed")
        if downgraded:
            print(f"[setup] error: {downgraded} were downgraded", file=sys.stderr)
            return 1
        return 0

    with open(args.requirements) as f:
        requirements = parse_requirements(f.read())
    installed = installed_versions()
    steps = plan(requirements, installed, args.keep)
    print(f"[setup] plan for {sys.executable} (never downgrades; exact pins only in .venv):")
    for step in steps:
        print(describe(step))
    os.makedirs(args.out, exist_ok=True)
    todo = [s for s in steps if s.action != "keep"]
    for filename, no_deps in (("install.txt", False), ("install-nodeps.txt", True)):
        with open(os.path.join(args.out, filename), "w") as f:
            f.writelines(f"{s.spec}\n" for s in todo if s.requirement.no_deps == no_deps)
    with open(os.path.join(args.out, "constraints.txt"), "w") as f:
        f.writelines(f"{line}\n" for line in constraints(installed))
    with open(os.path.join(args.out, "installed.json"), "w") as f:
        json.dump(installed, f, indent=1, sort_keys=True)
    print(f"[setup] {len(todo)} to install or upgrade, {len(steps) - len(todo)} kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
