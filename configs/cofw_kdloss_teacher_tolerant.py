"""Tolerant teacher (EfficientNet-B3 regressor, MSE to ASM soft landmarks, 97% variance) on COFW."""

from configs import kdloss


def get_config():
    return kdloss.experiment("cofw", "teacher_tolerant")
