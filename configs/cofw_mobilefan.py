"""MobileFAN on COFW without distillation (the paper's baseline student)."""

from configs import default


def get_config():
    return default.experiment("cofw", "mobilefan")
