"""WFLW builder; importing this registers the TFDS dataset 'wflw'."""

from .wflw_dataset_builder import Builder

__all__ = ["Builder"]
