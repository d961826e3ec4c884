"""Tough teacher (EfficientNet-B3 regressor, MSE to the ground-truth landmarks) on 300W."""

from configs import kdloss


def get_config():
    return kdloss.experiment("300w", "teacher_tough")
