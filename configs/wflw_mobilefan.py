"""MobileFAN on WFLW without distillation (the paper's baseline student)."""

from configs import default


def get_config():
    return default.experiment("wflw", "mobilefan")
