"""The commands of docs/small_data.md parse, and their configs (every key override) load and
build their augmentations, TTA and voting settings."""
import importlib.util
import os
import re
import shlex

from detectron2.engine import default_argument_parser

from conftest import REPO_ROOT
from gfocal.config import load_config
from gfocal.data.augmentation import build_train_augmentation
from gfocal.modeling.box_voting import DistributionVoting
from gfocal.inference.test_time_augmentation import DatasetMapperTTA

DOC = os.path.join(REPO_ROOT, "docs", "small_data.md")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands():
    text = open(DOC).read()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = "\n".join(b.replace("\\\n", " ") for b in blocks)
    return [shlex.split(line) for line in joined.splitlines() if line.startswith(".venv/bin/python")]


def test_doc_commands_parse_and_load():
    commands = _commands()
    _load("train_net", "train_net.py")  # the script loads
    ablation = _load("run_ablation", "tools/run_ablation.py")
    scripts = [c[1] for c in commands]
    assert scripts.count("train_net.py") >= 5 and "tools/run_ablation.py" in scripts
    for cmd in commands:
        if cmd[1] == "tools/run_ablation.py":
            args = ablation.parse_args(cmd[2:])
            assert args.variants and args.seeds == [0, 1, 2]
            continue
        if cmd[1] == "tools/main_job.py":  # its flags, and its overrides name existing keys
            args = _load("main_job", "tools/main_job.py").parse_args(cmd[2:])
            load_config(args.config_file, args.opts)
            continue
        if cmd[1].startswith("benchmarks/"):  # a benchmark's command parses with its own parser
            name = os.path.splitext(os.path.basename(cmd[1]))[0]
            _load(name, cmd[1]).get_parser().parse_args(cmd[2:])
            continue
        if cmd[1] == "tools/predict.py":
            _load("predict", "tools/predict.py").get_parser().parse_args(cmd[2:])
            continue
        assert cmd[1] == "train_net.py", cmd
        args = default_argument_parser().parse_args(cmd[2:])
        args.config_file = os.path.join(REPO_ROOT, args.config_file)
        cfg = load_config(args.config_file, args.opts)  # every override names an existing key
        build_train_augmentation(cfg)
        DatasetMapperTTA.from_config(cfg)
        DistributionVoting.from_config(cfg)
