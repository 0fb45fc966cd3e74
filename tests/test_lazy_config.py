"""The LazyConfig (Python) configs build what their YAML twins build: the same model (parameter
names, shapes, frozen parameters, settings such as the NMS threshold, outputs and losses on the
same weights), the same data pipeline, optimizer, lr schedule and training settings. A value
changed in one file and not in the other fails here."""
import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import DictConfig, ListConfig

from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetMapper
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils.events import EventStorage

from conftest import CONFIG_DIR, make_instances
from gfocal import add_gfl_config
from gfocal.data.augmentation import build_train_augmentation

PAIRS = {
    "gfl_R_50_FPN_1x": ("gfl_R_50_FPN_1x.yaml", "COCO-Detection/gfl_R_50_FPN_1x.py"),
    "atss_R_50_FPN_1x": ("atss_R_50_FPN_1x.yaml", "COCO-Detection/atss_R_50_FPN_1x.py"),
    "trees": ("trees/gfl_lite0_trees.yaml", "trees/gfl_lite0_trees.py"),
}


def load_pair(name):
    yaml_file, py_file = PAIRS[name]
    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, yaml_file))
    return cfg, LazyConfig.load(os.path.join(CONFIG_DIR, py_file))


def plain(value):
    """Settings as comparable values: containers as tuples, objects as (class, their settings)."""
    if isinstance(value, (list, tuple, ListConfig)):
        return tuple(plain(v) for v in value)
    if isinstance(value, (dict, DictConfig)):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    if isinstance(value, torch.Tensor):
        return tuple(value.tolist())
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return (type(value).__name__, {k: plain(v) for k, v in vars(value).items()})
    return value


def settings(module: torch.nn.Module) -> dict:
    """A module's plain attributes (not its parameters, buffers or submodules)."""
    return {k: plain(v) for k, v in vars(module).items() if not k.startswith("_")}


def names(value) -> list:
    return [value] if isinstance(value, str) else list(value)


def _toy_input(with_instances: bool):
    g = torch.Generator().manual_seed(0)
    x = {"image": torch.rand(3, 96, 128, generator=g) * 255, "height": 96, "width": 128}
    if with_instances:
        x["instances"] = make_instances((96, 128), [[10, 12, 60, 70], [50, 20, 120, 90]], [0, 0])
    return x


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_same_model(name):
    cfg, lazy = load_pair(name)
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    ours = build_model(cfg)
    theirs = instantiate(lazy.model)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in theirs.state_dict().items()} == shapes
    frozen = {n for n, p in ours.named_parameters() if not p.requires_grad}
    assert {n for n, p in theirs.named_parameters() if not p.requires_grad} == frozen
    for a, b in ((ours, theirs), (ours.backbone, theirs.backbone), (ours.head, theirs.head)):
        assert settings(b) == settings(a), type(a).__name__
    assert theirs.backbone.size_divisibility == ours.backbone.size_divisibility
    theirs.load_state_dict(ours.state_dict())

    for model in (ours, theirs):
        model.train()
    with EventStorage():
        losses = [m([_toy_input(True)]) for m in (ours, theirs)]
    assert losses[0].keys() == losses[1].keys()
    for key, value in losses[0].items():
        assert torch.equal(value, losses[1][key]), key
    for model in (ours, theirs):
        model.eval()
        model.test_score_thresh = 0.0  # untrained scores: keep detections to compare
    with torch.no_grad():
        out = [m([_toy_input(False)])[0]["instances"] for m in (ours, theirs)]
    assert len(out[0]) > 0
    for field, value in out[0].get_fields().items():
        value = value.tensor if hasattr(value, "tensor") else value
        other = out[1].get(field)
        assert torch.equal(value, other.tensor if hasattr(other, "tensor") else other), field


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_same_data_solver_and_schedule(name):
    cfg, lazy = load_pair(name)
    train, test = lazy.dataloader.train, lazy.dataloader.test
    for is_train, loader in ((True, train), (False, test)):
        # train_net.py's training mapper: detectron2's, with gfocal's augmentation list.
        augmentations = build_train_augmentation(cfg) if is_train else None
        want = DatasetMapper(cfg, is_train, **({"augmentations": augmentations} if is_train else {}))
        assert plain(vars(instantiate(loader.mapper))) == plain(vars(want))
        assert loader.num_workers == cfg.DATALOADER.NUM_WORKERS
    assert names(train.dataset.names) == list(cfg.DATASETS.TRAIN)
    assert train.dataset.num_classes == cfg.MODEL.GFL.NUM_CLASSES
    assert train.dataset.filter_empty == cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    assert names(test.dataset.names) == list(cfg.DATASETS.TEST)
    assert train.total_batch_size == cfg.SOLVER.IMS_PER_BATCH

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8))
    lazy.optimizer.params.model = model
    ours, theirs = build_optimizer(cfg, model), instantiate(lazy.optimizer)
    assert type(theirs).__name__ == type(ours).__name__
    assert [plain(g) for g in theirs.param_groups] == [plain(g) for g in ours.param_groups]
    clip = cfg.SOLVER.CLIP_GRADIENTS
    expected = None
    if clip.ENABLED:
        expected = dict(
            clip_type=clip.CLIP_TYPE, clip_value=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE
        )
    assert plain(lazy.optimizer.clip_gradients) == expected

    max_iter = cfg.SOLVER.MAX_ITER
    assert lazy.train.max_iter == max_iter
    yaml_multiplier = build_lr_scheduler(cfg, ours)._multiplier
    lazy_multiplier = instantiate(lazy.lr_multiplier)
    step = max(1, max_iter // 2000)
    for i in list(range(0, max_iter, step)) + [max_iter - 1]:
        where = i / max_iter
        assert lazy_multiplier(where) == pytest.approx(yaml_multiplier(where), rel=1e-12), i

    assert lazy.train.init_checkpoint == cfg.MODEL.WEIGHTS
    assert lazy.train.device == cfg.MODEL.DEVICE
    assert lazy.train.checkpointer.period == cfg.SOLVER.CHECKPOINT_PERIOD
    assert lazy.train.eval_period == cfg.TEST.EVAL_PERIOD
    assert lazy.train.amp.enabled == cfg.SOLVER.AMP.ENABLED
    assert lazy.train.seed == cfg.SEED
    assert lazy.train.reference_batch_size == cfg.SOLVER.REFERENCE_IMS_PER_BATCH
    assert lazy.train.output_dir == cfg.OUTPUT_DIR
    ema = lazy.train.get("model_ema", {})
    assert ema.get("enabled", False) == cfg.MODEL_EMA.ENABLED
    if cfg.MODEL_EMA.ENABLED:
        assert ema.get("decay", 0.999) == cfg.MODEL_EMA.DECAY
        assert ema.get("use_ema_weights_for_eval_only", False) == cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY


def _copypaste_ap(text: str) -> str:
    lines = [line for line in text.splitlines() if "copypaste: " in line]
    assert len(lines) >= 3 and "AP,AP50" in lines[-2], text[-3000:]
    return lines[-1].split("copypaste: ")[1]


@pytest.mark.trains_in_subprocess
def test_python_config_trains_and_evaluates(tmp_path):
    """A few iterations through lazyconfig_train_net.py, then --eval-only on the checkpoint: the
    same detections and AP as the evaluation after training (score threshold 0: an untrained
    model scores low)."""
    out = tmp_path / "out"
    script = os.path.join(os.path.dirname(CONFIG_DIR), "lazyconfig_train_net.py")
    config = os.path.join(CONFIG_DIR, "trees", "gfl_lite0_trees.py")
    common = [
        "model.test_score_thresh=0.0", "dataloader.test.num_workers=0",
        "dataloader.test.mapper.augmentations.0.short_edge_length=256",
        "dataloader.test.mapper.augmentations.0.max_size=256", f"train.output_dir={out}",
    ]
    train = [
        "train.max_iter=3", "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[256]",
        "dataloader.train.mapper.augmentations.0.max_size=256",
        "lr_multiplier.scheduler.milestones=[2]", "lr_multiplier.scheduler.values=[1.0,0.1]",
        "lr_multiplier.scheduler.num_updates=3",
    ]
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    runs = []
    for args in (train, ["--eval-only", f"train.init_checkpoint={out / 'model_final.pth'}"]):
        cmd = [sys.executable, "-W", "ignore", script, "--config-file", config, *args, *common]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs.append((_copypaste_ap(proc.stdout + proc.stderr),
                     json.loads((out / "inference" / "coco_instances_results.json").read_text())))
    (ap_after_training, detections), (ap_eval_only, detections_eval_only) = runs
    assert ap_after_training == ap_eval_only and ap_after_training.split(",")[0] != "nan"
    assert len(detections) > 0 and detections == detections_eval_only


def test_lazy_predictor_matches_default_predictor(tmp_path):
    from detectron2.engine import DefaultPredictor

    from gfocal.inference.predictor import LazyPredictor

    cfg, lazy = load_pair("trees")
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.GFL.SCORE_THRESH_TEST = 0.0  # untrained: keep detections to compare
    lazy.model.test_score_thresh = 0.0
    # A checkpoint without EMA weights: both predictors load its raw weights.
    lazy.train.model_ema.enabled = False
    lazy.train.model_ema.use_ema_weights_for_eval_only = False
    g = torch.Generator().manual_seed(1)
    image = (torch.rand(300, 360, 3, generator=g) * 255).byte().numpy()
    ours = DefaultPredictor(cfg)(image)["instances"]
    theirs = LazyPredictor(lazy, checkpoint=str(weights))(image)["instances"]
    assert len(ours) > 0 and ours.image_size == theirs.image_size == (300, 360)
    assert torch.equal(ours.pred_boxes.tensor, theirs.pred_boxes.tensor)
    assert torch.equal(ours.scores, theirs.scores)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) BGR image"):
        LazyPredictor(lazy, checkpoint=str(weights))(image[:, :, 0])
