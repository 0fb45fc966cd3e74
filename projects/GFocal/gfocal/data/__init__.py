"""Datasets and data checks of the GFL project."""
from .register import add_dataset_arguments, register_datasets_from_args
from .tree_crowns import build_tree_crowns, register_tree_crowns

register_tree_crowns()  # lazy: the tiles are built on the first DatasetCatalog.get
