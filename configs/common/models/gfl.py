# GFL R-50-FPN (configs/Base-GFL.yaml + gfl_R_50_FPN_1x.yaml as a LazyConfig model).
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, BasicStem, ResNet

from gfocal.modeling import GFL, GFLHead, GFLLossConfig, LastLevelP6P7

model = L(GFL)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
            out_features=["res3", "res4", "res5"],
            freeze_at=2,  # stem and first stage frozen
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        # P6 from the FPN output P5, no ReLU before P7 (the GFL reference).
        top_block=L(LastLevelP6P7)(
            in_channels="${..out_channels}", out_channels="${..out_channels}", in_feature="p5"
        ),
    ),
    head=L(GFLHead)(
        input_shape=[ShapeSpec(channels=256)] * 5,
        num_classes="${..num_classes}",
        box_dim=4 * (16 + 1),  # 4 edges x (reg_max + 1) bins
        with_quality_branch=False,
        num_convs=4,
        conv_dim=256,
        norm="GN",
        prior_prob=0.01,
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    num_classes=80,
    reg_max=16,
    anchor_scale=8.0,
    anchor_offset=0.0,
    topk=9,
    box_representation="distribution",
    # The loss variant (gfocal/modeling/loss_variants.py), checked at instantiate.
    loss=L(GFLLossConfig)(
        quality="joint",
        cls_loss="QFL",
        use_dfl=True,
        qfl_beta=2.0,
        focal_loss_alpha=0.25,
        focal_loss_gamma=2.0,
        weights={"loss_cls": 1.0, "loss_box": 2.0, "loss_dfl": 0.25, "loss_quality": 1.0},
    ),
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.6,
    max_detections_per_image=100,
    min_box_size_test=-1.0,
    output_distributions=False,
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
    input_format="BGR",
)
