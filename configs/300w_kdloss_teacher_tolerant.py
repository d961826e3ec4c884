"""Tolerant teacher (EfficientNet-B3 regressor, MSE to ASM soft landmarks, 97% variance) on 300W."""

from configs import kdloss


def get_config():
    return kdloss.experiment("300w", "teacher_tolerant")
