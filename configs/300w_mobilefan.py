"""MobileFAN on 300W without distillation (the paper's baseline student)."""

from configs import default


def get_config():
    return default.experiment("300w", "mobilefan")
