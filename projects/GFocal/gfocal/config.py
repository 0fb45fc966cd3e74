"""Config keys of the GFL project, added to a detectron2 config by :func:`add_gfl_config`."""
from detectron2.config import CfgNode as CN

# Allowed values of the string-valued switches, checked by ``GFL.from_config``.
CLS_LOSSES = ("QFL", "FL")
QUALITY_BRANCHES = ("joint", "centerness", "iou", "none")
BOX_REPRESENTATIONS = ("distribution", "dirac")


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
    _C.MODEL.GFL.QUALITY = "joint"  # "joint" | "centerness" | "iou" | "none"
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

    # Inference.
    _C.MODEL.GFL.SCORE_THRESH_TEST = 0.05
    _C.MODEL.GFL.TOPK_CANDIDATES_TEST = 1000
    _C.MODEL.GFL.NMS_THRESH_TEST = 0.6
    # Maximum detections per image: detectron2's TEST.DETECTIONS_PER_IMAGE (default 100).

    # FPN top block (P6, P7). The reference builds P6 from the FPN output P5 ("p5"; "res5" is
    # RetinaNet's choice) and applies no ReLU between P6 and P7 (detectron2's RetinaNet does).
    _C.MODEL.FPN.TOP_BLOCK_IN_FEATURE = "p5"
    _C.MODEL.FPN.TOP_BLOCK_RELU = False


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
    if (gfl.CLS_LOSS == "QFL") != (gfl.QUALITY == "joint"):
        raise ValueError(
            f"MODEL.GFL.CLS_LOSS={gfl.CLS_LOSS!r} with MODEL.GFL.QUALITY={gfl.QUALITY!r}: the joint "
            "quality representation is trained by QFL and QFL needs it; use CLS_LOSS 'QFL' with "
            "QUALITY 'joint', or CLS_LOSS 'FL' with QUALITY 'centerness', 'iou' or 'none'"
        )
    positive_ints = ("NUM_CLASSES", "REG_MAX", "TOPK", "NUM_CONVS", "TOPK_CANDIDATES_TEST")
    for key in positive_ints:
        if int(gfl[key]) < 1 and not (key == "NUM_CONVS" and gfl[key] == 0):
            raise ValueError(f"MODEL.GFL.{key}={gfl[key]} must be an integer >= 1")
    for key in ("LOSS_CLS_WEIGHT", "LOSS_BOX_WEIGHT", "LOSS_DFL_WEIGHT", "LOSS_QUALITY_WEIGHT"):
        if gfl[key] < 0:
            raise ValueError(f"MODEL.GFL.{key}={gfl[key]} must be >= 0")
    if gfl.QFL_BETA < 0:
        raise ValueError(f"MODEL.GFL.QFL_BETA={gfl.QFL_BETA} must be >= 0")
    for key in ("PRIOR_PROB", "SCORE_THRESH_TEST", "NMS_THRESH_TEST"):
        if not 0.0 <= gfl[key] <= 1.0:
            raise ValueError(f"MODEL.GFL.{key}={gfl[key]} must be in [0, 1]")
    if gfl.ANCHOR_SCALE <= 0:
        raise ValueError(f"MODEL.GFL.ANCHOR_SCALE={gfl.ANCHOR_SCALE} must be > 0")
