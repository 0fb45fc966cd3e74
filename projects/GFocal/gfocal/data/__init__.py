"""Datasets and data checks of the GFL project."""
