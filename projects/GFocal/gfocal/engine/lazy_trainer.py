"""Training and evaluation from a LazyConfig (Python) config, as detectron2's
tools/lazyconfig_train_net.py does, with this project's additions: GFLCheckpointer, the non-finite
loss guard, the weight EMA (``train.model_ema``: the YAML's MODEL_EMA keys in lower case), CPU
workers (DistributedDataParallel without device_ids) and bfloat16 autocast on CPU.
``lazyconfig_train_net.py`` is its command line."""
import argparse
import contextlib
import logging
from typing import List, Optional

from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from torch import nn

from ..config import load_lazy_config
from ..data.annotations import LAZY_NUM_CLASSES_KEY
from ..data.register import check_datasets
from ..data.tiling_config import apply_lazy_dataset_tiling
from ..model_io.checkpoint import GFLCheckpointer
from .amp import AutocastTrainer
from .batch_scaling import scale_lazy_solver_to_batch
from .hooks.ema import EMAHook, EMAState, load_ema_for_eval
from .hooks.nonfinite_guard import LAZY_ADVICE, NonFiniteLossGuard

__all__ = ["lazy_setup", "lazy_train_or_evaluate", "do_train", "do_test", "evaluate_checkpoint",
           "build_lazy_ema_state", "lazy_dataset_names"]

logger = logging.getLogger("detectron2")


def do_test(cfg, model: nn.Module, ema_state: Optional[EMAState] = None) -> dict:
    """Evaluate ``model`` (with the averaged weights of ``ema_state`` swapped in, if given) on
    ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``; {} without an evaluator."""
    if "evaluator" not in cfg.dataloader:
        return {}
    averaged = contextlib.nullcontext() if ema_state is None else ema_state.apply_and_restore(model)
    with averaged:
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
    print_csv_format(ret)
    return ret


def build_lazy_ema_state(cfg, model: nn.Module) -> Optional[EMAState]:
    """``train.model_ema`` (the MODEL_EMA keys in lower case): an EMAState of ``model``, or None.
    Training restarts it at the weights it starts from (:class:`EMAHook`)."""
    ema = cfg.train.get("model_ema", None)
    if not ema or not ema.get("enabled", False):
        return None
    state = EMAState(ema.get("include_frozen", True), ema.get("include_buffer", True),
                     ema.get("device", ""))
    return state.copy_from(model)


def _ddp(cfg, model: nn.Module, **kwargs) -> nn.Module:
    if cfg.train.device == "cpu":
        kwargs["device_ids"] = None  # DistributedDataParallel of a CPU model
    return create_ddp_model(model, **kwargs)


def do_train(cfg, resume: bool = False) -> None:
    """Train ``cfg.model`` for ``train.max_iter`` iterations from ``train.init_checkpoint`` (or
    the last checkpoint of ``train.output_dir`` with ``resume``)."""
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
    ema_state = build_lazy_ema_state(cfg, model)
    checkpointer = GFLCheckpointer(
        model, cfg.train.output_dir, optimizer=optimizer, trainer=trainer,
        **({} if ema_state is None else {"ema_state": ema_state}),
    )
    ema = cfg.train.get("model_ema", {})
    main = comm.is_main_process()
    trainer.register_hooks(
        [
            NonFiniteLossGuard(cfg.train.checkpointer.period, LAZY_ADVICE, checkpointer),
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            None if ema_state is None else EMAHook(
                ema_state, ema.get("decay", 0.999), ema.get("decay_warm_up_factor", -1.0)
            ),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model, ema_state)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            ) if main else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def evaluate_checkpoint(cfg) -> dict:
    """``--eval-only``: ``train.init_checkpoint`` evaluated (its EMA weights with
    ``train.model_ema.use_ema_weights_for_eval_only``)."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    ema_state = build_lazy_ema_state(cfg, model)
    checkpointer = GFLCheckpointer(model, **({} if ema_state is None else {"ema_state": ema_state}))
    checkpointer.load(cfg.train.init_checkpoint, checkpointables=[])
    use_ema = cfg.train.get("model_ema", {}).get("use_ema_weights_for_eval_only", False)
    ema_state = load_ema_for_eval(checkpointer, cfg.train.init_checkpoint, use_ema)
    return do_test(cfg, _ddp(cfg, model), ema_state)


def lazy_dataset_names(cfg) -> List[str]:
    """The dataset names of ``dataloader.train`` and ``dataloader.test``."""
    names = []
    for split in ("train", "test"):
        dataset = cfg.dataloader.get(split, {}).get("dataset", {})
        value = dataset.get("names", ()) if hasattr(dataset, "get") else ()
        names += [value] if isinstance(value, str) else list(value)
    return names


def lazy_setup(args: argparse.Namespace):
    """The config of ``args.config_file`` + ``args.opts`` (``train.reference_batch_size``
    applied), after tiling (``dataloader.tiling``) and checking its datasets; then detectron2's ``default_setup``."""
    cfg = load_lazy_config(args.config_file, args.opts)
    scaling = scale_lazy_solver_to_batch(cfg)
    # The data checks come before default_setup, which writes into train.output_dir.
    apply_lazy_dataset_tiling(cfg)  # dataloader.tiling: --dataset datasets cut into windows
    check_datasets(lazy_dataset_names(cfg), cfg.model.num_classes, key=LAZY_NUM_CLASSES_KEY)
    default_setup(cfg, args)
    if scaling:
        logger.info(scaling)
    return cfg


def lazy_train_or_evaluate(cfg, args: argparse.Namespace) -> Optional[dict]:
    """``args.eval_only``: :func:`evaluate_checkpoint`; else :func:`do_train`."""
    if args.eval_only:
        return evaluate_checkpoint(cfg)
    do_train(cfg, resume=args.resume)
    return None
