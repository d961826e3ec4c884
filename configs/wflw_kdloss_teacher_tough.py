"""Tough teacher (EfficientNet-B3 regressor, MSE to the ground-truth landmarks) on WFLW."""

from configs import kdloss


def get_config():
    return kdloss.experiment("wflw", "teacher_tough")
