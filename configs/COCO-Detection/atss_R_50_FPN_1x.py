# Paper Table 3 baseline, ATSS R-50 1x (configs/atss_R_50_FPN_1x.yaml as a LazyConfig): Focal Loss,
# a centerness branch and a Dirac box, 39.2 AP.
from .gfl_R_50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.loss.cls_loss = "FL"
model.loss.quality = "centerness"
model.loss.use_dfl = False
model.box_representation = "dirac"
model.head.box_dim = 4
model.head.with_quality_branch = True

train.output_dir = "./output/atss_R_50_FPN_1x"
