"""Tolerant teacher (EfficientNet-B3 regressor, MSE to ASM soft landmarks, 97% variance) on WFLW."""

from configs import kdloss


def get_config():
    return kdloss.experiment("wflw", "teacher_tolerant")
