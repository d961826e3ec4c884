"""Tough teacher (EfficientNet-B3 regressor, MSE to the ground-truth landmarks) on COFW."""

from configs import kdloss


def get_config():
    return kdloss.experiment("cofw", "teacher_tough")
