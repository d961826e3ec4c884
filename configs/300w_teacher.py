"""Teacher on 300W: ResNet-50 + 3 x 256-channel deconvolutions (Simple Baselines), ~34M parameters."""

from configs import default


def get_config():
    return default.experiment("300w", "teacher")
