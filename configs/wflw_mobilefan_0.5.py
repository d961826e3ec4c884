"""MobileFAN (0.5) on WFLW: 64-channel decoder, no distillation."""

from configs import default


def get_config():
    return default.experiment("wflw", "mobilefan_0.5")
