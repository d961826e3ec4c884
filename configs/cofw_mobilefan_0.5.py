"""MobileFAN (0.5) on COFW: 64-channel decoder, no distillation."""

from configs import default


def get_config():
    return default.experiment("cofw", "mobilefan_0.5")
