#!/usr/bin/env python
"""Train and evaluate GFL from a LazyConfig (Python) config, as detectron2's
tools/lazyconfig_train_net.py does, with this project's additions (GFLCheckpointer, CPU workers,
bfloat16 autocast on CPU).

    python lazyconfig_train_net.py --config-file configs/COCO-Detection/gfl_R_50_FPN_1x.py --num-gpus 8
    python lazyconfig_train_net.py --config-file configs/trees/gfl_lite0_trees.py
    python lazyconfig_train_net.py --config-file configs/trees/gfl_lite0_trees.py --eval-only \\
        train.init_checkpoint=output/trees/gfl_lite0/model_final.pth

Trailing ``key=value`` overrides are LazyConfig's (``train.max_iter=100``, ``optimizer.lr=0.01``).
Your own annotations: ``--dataset NAME=FORMAT:PATH[:IMAGE_ROOT]`` as in train_net.py, then
``dataloader.train.dataset.names=NAME dataloader.test.dataset.names=... model.num_classes=K
dataloader.train.dataset.num_classes=K`` (docs/own_data.md). ``train.reference_batch_size=16``
scales optimizer.lr and the warm-up to ``dataloader.train.total_batch_size`` (linear scaling).
``train.model_ema`` (enabled, decay, ...: the YAML's MODEL_EMA keys in lower case) averages the
weights (gfocal/engine/hooks/ema.py); evaluation is then of the averages.
With ``train.device=cpu``, ``--num-gpus N`` starts N CPU worker processes (gloo).
"""
import contextlib
import logging

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

import gfocal  # noqa: F401  (registers the GFL meta-architecture, backbones and datasets)
from gfocal.engine.amp import AutocastTrainer
from gfocal.engine.batch_scaling import scale_lazy_solver_to_batch
from gfocal.model_io.checkpoint import GFLCheckpointer
from gfocal.data.annotations import LAZY_NUM_CLASSES_KEY
from gfocal.data.register import add_dataset_arguments, check_datasets, register_datasets_from_args
from gfocal.engine.hooks.ema import EMAHook, EMAState, load_ema_for_eval
from gfocal.engine import launch
from gfocal.engine.hooks.nonfinite_guard import LAZY_ADVICE, NonFiniteLossGuard

logger = logging.getLogger("detectron2")


def do_test(cfg, model, ema_state=None):
    """Evaluate ``model`` (with the averaged weights of ``ema_state`` swapped in, if given)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    averaged = contextlib.nullcontext() if ema_state is None else ema_state.apply_and_restore(model)
    with averaged:
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
    print_csv_format(ret)
    return ret


def build_ema_state(cfg, model):
    """``train.model_ema`` (the MODEL_EMA keys in lower case): an EMAState of ``model``, or None."""
    ema = cfg.train.get("model_ema", None)
    if not ema or not ema.get("enabled", False):
        return None
    state = EMAState(ema.get("include_frozen", True), ema.get("include_buffer", True),
                     ema.get("device", ""))
    return state.copy_from(model)


def _ddp(cfg, model, **kwargs):
    if cfg.train.device == "cpu":
        kwargs["device_ids"] = None  # DistributedDataParallel of a CPU model
    return create_ddp_model(model, **kwargs)


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = _ddp(cfg, model, **cfg.train.ddp)
    if cfg.train.amp.enabled:
        trainer = (AutocastTrainer if cfg.train.device == "cpu" else AMPTrainer)(
            model, train_loader, optimizer
        )
    else:
        trainer = SimpleTrainer(model, train_loader, optimizer)
    ema_state = build_ema_state(cfg, model)
    checkpointer = GFLCheckpointer(
        model, cfg.train.output_dir, optimizer=optimizer, trainer=trainer,
        **({} if ema_state is None else {"ema_state": ema_state}),
    )
    ema = cfg.train.get("model_ema", {})
    trainer.register_hooks(
        [
            NonFiniteLossGuard(cfg.train.checkpointer.period, LAZY_ADVICE, checkpointer),
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            None if ema_state is None else EMAHook(
                ema_state, ema.get("decay", 0.999), ema.get("decay_warm_up_factor", -1.0)
            ),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model, ema_state)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def load_config(args):
    cfg = LazyConfig.load(args.config_file)
    return LazyConfig.apply_overrides(cfg, args.opts)


def _dataset_names(cfg) -> list:
    names = []
    for split in ("train", "test"):
        dataset = cfg.dataloader.get(split, {}).get("dataset", {})
        value = dataset.get("names", ()) if hasattr(dataset, "get") else ()
        names += [value] if isinstance(value, str) else list(value)
    return names


def main(args):
    register_datasets_from_args(args)  # in every worker process
    cfg = load_config(args)
    scaling = scale_lazy_solver_to_batch(cfg)
    # The data checks come before default_setup, which writes into train.output_dir.
    check_datasets(_dataset_names(cfg), cfg.model.num_classes, key=LAZY_NUM_CLASSES_KEY)
    default_setup(cfg, args)
    if scaling:
        logger.info(scaling)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        ema_state = build_ema_state(cfg, model)
        checkpointer = GFLCheckpointer(model, **({} if ema_state is None else {"ema_state": ema_state}))
        checkpointer.load(cfg.train.init_checkpoint, checkpointables=[])
        use_ema = cfg.train.get("model_ema", {}).get("use_ema_weights_for_eval_only", False)
        ema_state = load_ema_for_eval(checkpointer, cfg.train.init_checkpoint, use_ema)
        return do_test(cfg, _ddp(cfg, model), ema_state)
    do_train(args, cfg)


if __name__ == "__main__":
    args = add_dataset_arguments(default_argument_parser()).parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=load_config(args).train.device,
    )
