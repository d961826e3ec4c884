"""COFW builder; importing this registers the TFDS dataset 'cofw'."""

from .cofw_dataset_builder import Builder

__all__ = ["Builder"]
