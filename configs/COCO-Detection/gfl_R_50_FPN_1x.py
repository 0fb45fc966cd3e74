# GFL R-50-FPN 1x on COCO (configs/gfl_R_50_FPN_1x.yaml as a LazyConfig): 40.2 AP (reference).
from ..common.data.detection import dataloader
from ..common.models.gfl import model
from ..common.optim import SGD as optimizer
from ..common.schedule import lr_multiplier_1x as lr_multiplier
from ..common.train import train

train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.output_dir = "./output/gfl_R_50_FPN_1x"
