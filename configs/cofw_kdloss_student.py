"""KD-Loss student (MobileNetV2 regressor) with the Tough and Tolerant teachers on COFW.

Train both teachers first:
  python -m fan_jax.main --config=configs/cofw_kdloss_teacher_tough.py --workdir=workdirs/cofw_kdloss_teacher_tough
  python -m fan_jax.main --config=configs/cofw_kdloss_teacher_tolerant.py --workdir=workdirs/cofw_kdloss_teacher_tolerant
"""

from configs import kdloss


def get_config():
    return kdloss.experiment("cofw", "student")
