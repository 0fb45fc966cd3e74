# Detection data as train_net.py loads it: training records checked and cleaned by
# gfocal.data.annotations (train_dataset_dicts), COCO box evaluation (the fast C++ one only where
# detectron2's ops exist). COCO 2017 and detectron2's default 800 px resize here.
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator

from gfocal.data.annotations import train_dataset_dicts
from gfocal.utils import has_detectron2_ops

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(train_dataset_dicts)(names="coco_2017_train", num_classes=80, filter_empty=True),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333, sample_style="choice")
        ],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    tasks=("bbox",),
    output_dir="${train.output_dir}/inference",
    use_fast_impl=L(has_detectron2_ops)(),
)
