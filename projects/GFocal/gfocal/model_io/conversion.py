"""Convert mmdetection GFL checkpoints (v1 = the official GFocal repository, v2, v3) and the
official GFocalV2 checkpoints (mmdetection v2 layout plus the DGQP convs ``bbox_head.reg_conf.0``
and ``.2``) to the state dict of :class:`gfocal.GFL` built with ``build_gfl_resnet_fpn_backbone``.

Every source key is consumed exactly once (weights are renamed; ``num_batches_tracked`` counters,
the fixed integral projection and mmdet's data-preprocessor buffers are checked and dropped) and,
given the target model's state dict, every model key must be filled with a tensor of its shape.
Anything else raises :class:`ConversionError` listing the offending keys.
"""
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "ConversionError",
    "ConversionInfo",
    "convert_mmdet_gfl_state_dict",
    "check_against_model",
    "load_mmdet_checkpoint",
    "convert_mmdet_gfl_checkpoint",
    "check_dgqp_config",
]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted to the configured GFL model."""


@dataclass
class ConversionInfo:
    """What the converter read from the source checkpoint."""

    num_classes: int
    reg_max: int
    num_convs: int
    num_levels: int
    dropped: List[str] = field(default_factory=list)
    # GFocalV2 (DGQP): input and hidden channels of bbox_head.reg_conf.0; 0 for a GFL (v1) head.
    dgqp_inputs: int = 0
    dgqp_channels: int = 0

    @property
    def is_gflv2(self) -> bool:
        return self.dgqp_channels > 0


_NORM_PARAMS = r"(weight|bias|running_mean|running_var)"

# (source pattern, target template) for the backbone; ``{stage}`` is mmdet's layer index + 1.
_BACKBONE_RULES: List[Tuple[str, Callable[[re.Match], str]]] = [
    (r"backbone\.conv1\.weight", lambda m: "backbone.bottom_up.stem.conv1.weight"),
    (rf"backbone\.bn1\.{_NORM_PARAMS}", lambda m: f"backbone.bottom_up.stem.conv1.norm.{m[1]}"),
    (
        r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight",
        lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight",
    ),
    (
        rf"backbone\.layer(\d)\.(\d+)\.bn(\d)\.{_NORM_PARAMS}",
        lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}",
    ),
    (
        r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight",
        lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.weight",
    ),
    (
        rf"backbone\.layer(\d)\.(\d+)\.downsample\.1\.{_NORM_PARAMS}",
        lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}",
    ),
    # DCNv2 offset/mask convs: mmdet v2/v3 (mmcv ModulatedDeformConv2dPack) and v1 names. Both
    # lay out the 27 channels as detectron2's DeformBottleneckBlock does (x, y offsets, mask).
    (
        r"backbone\.layer(\d)\.(\d+)\.conv2\.conv_offset\.(weight|bias)",
        lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv2_offset.{m[3]}",
    ),
    (
        r"backbone\.layer(\d)\.(\d+)\.conv2_offset\.(weight|bias)",
        lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv2_offset.{m[3]}",
    ),
]

# Keys that are checked (or carry nothing) and dropped.
_DROPPED = (
    r".*\.num_batches_tracked",
    r"bbox_head\.(integral|distribution_project)\.project",
    r"data_preprocessor\.(mean|std)",
)


def _neck_rules(start_level: int) -> List[Tuple[str, Callable[[re.Match], str]]]:
    """mmdet FPN (``start_level``-based indices, ``add_extra_convs``: fpn_convs after the
    input levels are P6, P7) -> detectron2 FPN + top block."""

    def lateral(m: re.Match) -> str:
        return f"backbone.fpn_lateral{int(m[1]) + start_level + 2}.{m[2]}"

    def output(m: re.Match) -> str:
        return f"backbone.fpn_output{int(m[1]) + start_level + 2}.{m[2]}"

    return [
        (r"neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)", lateral),
        (r"neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)", output),
    ]


def _head_rules(norm: bool = True) -> List[Tuple[str, Callable[[re.Match], str]]]:
    """mmdet GFLHead -> :class:`gfocal.GFLHead` (towers are Sequential conv, GN, ReLU)."""
    step = 3 if norm else 2
    towers = {"cls_convs": "cls_tower", "reg_convs": "box_tower"}
    return [
        (
            r"bbox_head\.(cls_convs|reg_convs)\.(\d+)\.conv\.(weight|bias)",
            lambda m: f"head.{towers[m[1]]}.{int(m[2]) * step}.{m[3]}",
        ),
        (
            r"bbox_head\.(cls_convs|reg_convs)\.(\d+)\.gn\.(weight|bias)",
            lambda m: f"head.{towers[m[1]]}.{int(m[2]) * step + 1}.{m[3]}",
        ),
        (r"bbox_head\.gfl_cls\.(weight|bias)", lambda m: f"head.cls_score.{m[1]}"),
        (r"bbox_head\.gfl_reg\.(weight|bias)", lambda m: f"head.box_pred.{m[1]}"),
        (r"bbox_head\.scales\.(\d+)\.scale", lambda m: f"head.scales.{m[1]}.scale"),
        # GFocalV2's DGQP: reg_conf = Sequential(conv 1x1, ReLU, conv 1x1, Sigmoid).
        (r"bbox_head\.reg_conf\.0\.(weight|bias)", lambda m: f"head.dgqp.hidden.{m[1]}"),
        (r"bbox_head\.reg_conf\.2\.(weight|bias)", lambda m: f"head.dgqp.out.{m[1]}"),
    ]


def _inspect_head(state_dict: Mapping[str, Tensor]) -> ConversionInfo:
    """Read class count, reg_max and head depth; refuse checkpoints that are not GFL."""
    needed = ("bbox_head.gfl_cls.weight", "bbox_head.gfl_reg.weight")
    absent = [k for k in needed if k not in state_dict]
    if absent:
        heads = sorted({".".join(k.split(".")[:2]) for k in state_dict if k.startswith("bbox_head.")})
        raise ConversionError(
            f"not a GFL checkpoint: it lacks {absent} (its head modules: {heads or 'none'}); "
            "only mmdetection GFLHead checkpoints (gfl_cls/gfl_reg) can be converted"
        )
    num_classes = state_dict["bbox_head.gfl_cls.weight"].shape[0]
    reg_channels = state_dict["bbox_head.gfl_reg.weight"].shape[0]
    if reg_channels % 4 != 0 or reg_channels < 8:
        raise ConversionError(
            f"bbox_head.gfl_reg.weight has {reg_channels} output channels; a GFL head has "
            "4 * (reg_max + 1)"
        )
    convs = {int(m[1]) for k in state_dict if (m := re.match(r"bbox_head\.cls_convs\.(\d+)\.", k))}
    levels = {int(m[1]) for k in state_dict if (m := re.match(r"bbox_head\.scales\.(\d+)\.", k))}
    info = ConversionInfo(num_classes, reg_channels // 4 - 1, len(convs), len(levels))
    dgqp_keys = sorted(k for k in state_dict if k.startswith("bbox_head.reg_conf."))
    if dgqp_keys:
        hidden = state_dict.get("bbox_head.reg_conf.0.weight")
        if hidden is None or hidden.dim() != 4 or hidden.shape[2:] != (1, 1):
            raise ConversionError(
                f"GFocalV2 keys {dgqp_keys} without a 1x1 conv bbox_head.reg_conf.0.weight: "
                "not the DGQP layout (conv 1x1, ReLU, conv 1x1, Sigmoid)"
            )
        info.dgqp_channels, info.dgqp_inputs = int(hidden.shape[0]), int(hidden.shape[1])
    return info


def _check_dropped(key: str, value: Tensor, reg_max: int) -> None:
    if key.endswith(".project"):
        expected = torch.arange(reg_max + 1, dtype=torch.float32)
        if value.shape != expected.shape or not torch.allclose(value.float(), expected):
            raise ConversionError(
                f"{key} = {value.tolist()} is not the integral projection 0..{reg_max} "
                "that the model uses"
            )


def convert_mmdet_gfl_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    num_classes: Optional[int] = None,
    reg_max: Optional[int] = None,
    start_level: int = 1,
) -> Tuple[Dict[str, Tensor], ConversionInfo]:
    """Rename an mmdetection GFL state dict (v1, v2 or v3) to detectron2 GFL names.

    Args:
        state_dict: the ``state_dict`` of an mmdetection GFL checkpoint.
        num_classes, reg_max: when given (``MODEL.GFL.NUM_CLASSES`` / ``REG_MAX``), the checkpoint
            must have these, else :class:`ConversionError`.
        start_level: mmdet FPN ``start_level`` (1: C3-C5 in, as in every published GFL model).

    Returns:
        the converted state dict and what was read from the checkpoint.
    """
    info = _inspect_head(state_dict)
    if num_classes is not None and info.num_classes != num_classes:
        raise ConversionError(
            f"the checkpoint has {info.num_classes} classes (bbox_head.gfl_cls), the config "
            f"MODEL.GFL.NUM_CLASSES={num_classes}"
        )
    if reg_max is not None and info.reg_max != reg_max:
        raise ConversionError(
            f"the checkpoint has reg_max={info.reg_max} (bbox_head.gfl_reg has "
            f"{4 * (info.reg_max + 1)} channels), the config MODEL.GFL.REG_MAX={reg_max}"
        )
    rules = _BACKBONE_RULES + _neck_rules(start_level) + _head_rules()
    dropped_patterns = [re.compile(p) for p in _DROPPED]
    compiled = [(re.compile(p), fn) for p, fn in rules]
    num_inputs = len({k.split(".")[2] for k in state_dict if k.startswith("neck.lateral_convs.")})

    converted: Dict[str, Tensor] = {}
    sources: Dict[str, str] = {}
    unknown: List[str] = []
    for key, value in state_dict.items():
        if any(p.fullmatch(key) for p in dropped_patterns):
            _check_dropped(key, value, info.reg_max)
            info.dropped.append(key)
            continue
        for pattern, target_fn in compiled:
            m = pattern.fullmatch(key)
            if m:
                target = target_fn(m)
                break
        else:
            unknown.append(key)
            continue
        # mmdet's fpn_convs beyond the input levels are the extra (P6, P7) convs.
        fm = re.fullmatch(r"neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)", key)
        if fm and int(fm[1]) >= num_inputs:
            target = f"backbone.top_block.p{int(fm[1]) - num_inputs + 6}.{fm[2]}"
        if target in converted:
            raise ConversionError(f"{key} and {sources[target]} both map to {target}")
        converted[target] = value
        sources[target] = key
    if unknown:
        raise ConversionError(
            f"{len(unknown)} checkpoint keys have no detectron2 GFL counterpart: {sorted(unknown)}"
        )
    return converted, info


def check_dgqp_config(info: ConversionInfo, cfg) -> None:
    """Require a GFocalV2 checkpoint for a ``MODEL.GFL.QUALITY 'dgqp'`` config and a GFL (v1) one
    otherwise, with the DGQP sizes of the config (``MODEL.GFL.DGQP``)."""
    gfl = cfg.MODEL.GFL
    if info.is_gflv2 and gfl.QUALITY != "dgqp":
        raise ConversionError(
            "the checkpoint is a GFocalV2 model (it has the DGQP convs bbox_head.reg_conf.*), the "
            f"config MODEL.GFL.QUALITY={gfl.QUALITY!r}; use a GFocalV2 config "
            "(configs/mmdet/gfocalv2_*.yaml) or MODEL.GFL.QUALITY dgqp"
        )
    if not info.is_gflv2 and gfl.QUALITY == "dgqp":
        raise ConversionError(
            "the config has MODEL.GFL.QUALITY='dgqp' but the checkpoint has no DGQP convs "
            "(bbox_head.reg_conf.0/.2): it is a GFL (v1) model; use a configs/mmdet/gfl_*.yaml config"
        )
    if info.is_gflv2:
        inputs = 4 * (gfl.DGQP.TOPK + int(gfl.DGQP.ADD_MEAN))
        if (info.dgqp_inputs, info.dgqp_channels) != (inputs, gfl.DGQP.CHANNELS):
            raise ConversionError(
                f"bbox_head.reg_conf.0.weight maps {info.dgqp_inputs} statistics to "
                f"{info.dgqp_channels} channels; the config's DGQP maps 4 * (MODEL.GFL.DGQP.TOPK="
                f"{gfl.DGQP.TOPK} + MODEL.GFL.DGQP.ADD_MEAN={gfl.DGQP.ADD_MEAN}) = {inputs} to "
                f"MODEL.GFL.DGQP.CHANNELS={gfl.DGQP.CHANNELS}"
            )


def check_against_model(converted: Mapping[str, Tensor], model_state: Mapping[str, Tensor]) -> None:
    """Require every model key filled and every converted key used, with equal shapes."""
    missing = sorted(set(model_state) - set(converted))
    unexpected = sorted(set(converted) - set(model_state))
    shapes = sorted(
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in set(converted) & set(model_state)
        if converted[k].shape != model_state[k].shape
    )
    problems = []
    if missing:
        problems.append(f"model keys not filled by the checkpoint: {missing}")
    if unexpected:
        problems.append(f"converted keys the model does not have: {unexpected}")
    if shapes:
        problems.append(f"shape mismatches: {shapes}")
    if problems:
        raise ConversionError(
            "the converted checkpoint does not match the configured model (check the config's "
            "MODEL.RESNETS.DEPTH / NUM_GROUPS / DEFORM_ON_PER_STAGE and MODEL.GFL keys):\n  "
            + "\n  ".join(problems)
        )


def load_mmdet_checkpoint(path: str, allow_pickle: bool = False) -> Dict[str, Tensor]:
    """Read the state dict of an mmdetection checkpoint file (``{"state_dict": ...}`` or a bare
    state dict). ``allow_pickle`` permits arbitrary pickled objects in it (trusted files only)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises UnpicklingError or RuntimeError, depending on version
        if allow_pickle:
            raise
        raise ConversionError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); if you trust this file, pass "
            "--allow-pickle (allow_pickle=True)"
        ) from e
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ConversionError(
            f"{path}: no 'state_dict' of tensors found (top-level keys: {sorted(checkpoint)[:20]})"
        )
    # Checkpoints saved from DataParallel/DDP wrappers prefix every key with "module.".
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def convert_mmdet_gfl_checkpoint(src: str, dst: str, cfg, allow_pickle: bool = False) -> ConversionInfo:
    """Convert the mmdetection GFL checkpoint ``src`` for the detectron2 config ``cfg`` (validated
    against a model built from it) and save it as a detectron2 checkpoint ``dst``."""
    from detectron2.modeling import META_ARCH_REGISTRY

    state_dict = load_mmdet_checkpoint(src, allow_pickle)
    converted, info = convert_mmdet_gfl_state_dict(
        state_dict, num_classes=cfg.MODEL.GFL.NUM_CLASSES, reg_max=cfg.MODEL.GFL.REG_MAX
    )
    check_dgqp_config(info, cfg)
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation cost
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    check_against_model(converted, model.state_dict())
    torch.save(
        {"model": converted, "__author__": f"gfocal.model_io.conversion of {src}", "matching_heuristics": False},
        dst,
    )
    return info
