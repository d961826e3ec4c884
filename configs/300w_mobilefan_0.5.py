"""MobileFAN (0.5) on 300W: 64-channel decoder, no distillation."""

from configs import default


def get_config():
    return default.experiment("300w", "mobilefan_0.5")
