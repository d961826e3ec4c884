"""300W builder; importing this registers the TFDS dataset 'the300w'."""

from .the300w_dataset_builder import Builder

__all__ = ["Builder"]
