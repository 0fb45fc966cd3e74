"""The one config loader, the reported COCO metrics read from detectron2's results and a run's
metrics.json, and the ablation sweep's plan (which runs are pending, the best lr)."""
import json
import os

import pytest

from conftest import CONFIG_DIR
from gfocal.config import load_config, load_lazy_config
from gfocal.engine.ablation import AblationPlan, ablation_config, schedule
from gfocal.evaluation import METRIC_KEYS, box_metrics, logged_box_metrics


def test_load_config_merges_file_overrides_and_project_keys():
    path = os.path.join(CONFIG_DIR, "trees", "gfl_lite0_trees.yaml")
    cfg = load_config(path, ["SOLVER.MAX_ITER", "7", "MODEL.GFL.REG_MAX", "8"])
    assert cfg.SOLVER.MAX_ITER == 7 and cfg.MODEL.GFL.REG_MAX == 8
    assert cfg.MODEL.GFL.NMS_THRESH_TEST == 0.4  # from the file
    assert cfg.MODEL_EMA.ENABLED and cfg.TEST.AUG.DIHEDRAL  # project keys, set by the file
    assert not cfg.is_frozen()
    with pytest.raises(FileNotFoundError, match="--config-file nope.yaml: no such file"):
        load_config("nope.yaml")
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.GFL.NO_SUCH_KEY"):  # yacs
        load_config(path, ["MODEL.GFL.NO_SUCH_KEY", "1"])
    lazy = load_lazy_config(os.path.join(CONFIG_DIR, "trees", "gfl_lite0_trees.py"),
                            ["train.max_iter=11"])
    assert lazy.train.max_iter == 11
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_lazy_config("nope.py")


def _bbox(ap):
    return {"AP": ap, "AP50": ap + 1, "AP75": ap + 2, "APs": 0.0}


def test_box_metrics_of_one_or_several_datasets():
    one = {"bbox": _bbox(10.0), "bbox_TTA": _bbox(12.0)}
    assert box_metrics(one, "val") == {"AP": 10.0, "AP50": 11.0, "AP75": 12.0}
    assert box_metrics(one, "val", "_TTA")["AP"] == 12.0
    several = {"train": {"bbox": _bbox(30.0)}, "val": {"bbox": _bbox(20.0)},
               "val_TTA": {"bbox": _bbox(21.0)}}
    assert box_metrics(several, "val", num_datasets=2)["AP"] == 20.0
    assert box_metrics(several, "val", "_TTA", num_datasets=2)["AP75"] == 23.0
    with pytest.raises(KeyError, match="'train_TTA'"):
        box_metrics(several, "train", "_TTA", num_datasets=2)
    # COCOEvaluator's NaN for a model without any detection counts as 0.
    assert box_metrics({"bbox": _bbox(float("nan"))}, "val")["AP"] == 0.0


def test_logged_box_metrics_reads_the_last_evaluation(tmp_path):
    path = tmp_path / "metrics.json"
    lines = [{"iteration": 1, "total_loss": 2.0},
             {"iteration": 2, "bbox/AP": 1.0, "bbox/AP50": 2.0, "bbox/AP75": 3.0},
             {"iteration": 3, "total_loss": 1.0},
             {"iteration": 4, "bbox/AP": 4.5, "bbox/AP50": 5.5, "bbox/AP75": float("nan"),
              "bbox_TTA/AP": 7.0, "bbox_TTA/AP50": 8.0, "bbox_TTA/AP75": 9.0}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert logged_box_metrics(str(path), "val") == {"AP": 4.5, "AP50": 5.5, "AP75": 0.0}
    assert logged_box_metrics(str(path), "val", "_TTA")["AP"] == 7.0
    with pytest.raises(KeyError, match="no evaluation"):
        logged_box_metrics(str(path), "val", "_raw")
    assert METRIC_KEYS == ("AP", "AP50", "AP75")


def test_ablation_plan_sweeps_then_runs_the_seeds_at_the_best_lr(tmp_path):
    plan = AblationPlan(str(tmp_path), ["gfl"], [0.01, 0.02], [0, 1])
    assert plan.pending() == [("gfl", 0.01, 0), ("gfl", 0.02, 0)] and plan.best_lr("gfl") is None
    for lr, ap in ((0.01, 5.0), (0.02, 9.0)):
        os.makedirs(plan.run_dir("gfl", lr, 0))
        with open(os.path.join(plan.run_dir("gfl", lr, 0), "results.json"), "w") as f:
            json.dump({"AP": ap}, f)
    assert plan.best_lr("gfl") == 0.02 and plan.pending() == [("gfl", 0.02, 1)]
    assert schedule(100)[:4] == ["SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(75, 90)"]
    cfg = ablation_config(os.path.join(CONFIG_DIR, "trees", "gfl_lite0_trees.yaml"), "atss", 0.02,
                          1, str(tmp_path / "run"), max_iter=100)
    assert cfg.MODEL.GFL.CLS_LOSS == "FL" and cfg.MODEL.GFL.BOX_REPRESENTATION == "dirac"
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.SEED == 1 and cfg.SOLVER.MAX_ITER == 100
    assert list(cfg.DATASETS.TEST) == ["neon_trees_train", "neon_trees_val"] and cfg.is_frozen()
    with pytest.raises(ValueError, match="variant 'nope'"):
        ablation_config(os.path.join(CONFIG_DIR, "trees", "gfl_lite0_trees.yaml"), "nope", 0.02,
                        0, str(tmp_path))


@pytest.mark.parametrize("variant", ["atss", "qfl", "dfl", "gfl", "gflv2"])
def test_every_gfl_ablation_variant_builds_on_the_tree_recipe(variant, tmp_path):
    """The tree recipe votes with variance weights; the Dirac variants (no distribution) must
    still build (tools/run_ablation.py --variants atss qfl ...)."""
    from detectron2.modeling import build_model

    from gfocal.engine.ablation import ablation_config

    cfg = ablation_config(os.path.join(CONFIG_DIR, "trees", "gfl_lite0_trees.yaml"), variant, 0.02,
                          0, str(tmp_path), opts=["MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB", "0"])
    assert cfg.MODEL.GFL.BOX_VOTING.ENABLED
    build_model(cfg)
