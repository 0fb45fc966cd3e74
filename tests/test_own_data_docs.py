"""Every command in docs/own_data.md parses with its tool's own parser, its --dataset specs parse,
and its config overrides are keys of the config it names (the commands themselves run in
test_own_data.py, test_finetune.py, test_training_guards.py and test_analyze_dataset.py)."""
import importlib.util
import os
import re
import shlex
import sys

import pytest

from detectron2.config import LazyConfig, get_cfg

from conftest import REPO_ROOT
from gfocal import add_gfl_config
from gfocal.data.register import add_dataset_arguments, parse_dataset_spec

DOC = os.path.join(REPO_ROOT, "docs", "own_data.md")


def commands():
    text = open(DOC).read()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    out = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith("python "):
                out.append(shlex.split(command)[1:])
    return out


def _module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(REPO_ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def _parser(script):
    module = _module(script)
    if script in ("train_net.py", "lazyconfig_train_net.py"):
        return add_dataset_arguments(module.default_argument_parser())
    return module.get_parser()


def test_the_doc_has_the_commands():
    scripts = [c[0] for c in commands()]
    for script in ("train_net.py", "lazyconfig_train_net.py", "tools/demo.py",
                   "tools/convert_mmdet_gfl.py", "tools/analyze_dataset.py"):
        assert script in scripts


@pytest.mark.parametrize("argv", commands(), ids=lambda a: a[0])
def test_command_parses(argv):
    script, args = argv[0], argv[1:]
    parsed = _parser(script).parse_args(args)
    for spec in getattr(parsed, "dataset", []):
        parse_dataset_spec(spec)
    config = parsed.config_file
    if not os.path.isfile(os.path.join(REPO_ROOT, config)):
        return  # a config written by training (output/mine/config.yaml)
    if config.endswith(".py"):
        cfg = LazyConfig.load(os.path.join(REPO_ROOT, config))
        LazyConfig.apply_overrides(cfg, parsed.opts)
    else:
        cfg = get_cfg()
        add_gfl_config(cfg)
        cfg.merge_from_file(os.path.join(REPO_ROOT, config))
        cfg.merge_from_list(parsed.opts)
