"""KD-Loss student (MobileNetV2 regressor) with the Tough and Tolerant teachers on 300W.

Train both teachers first:
  python -m fan_jax.main --config=configs/300w_kdloss_teacher_tough.py --workdir=workdirs/300w_kdloss_teacher_tough
  python -m fan_jax.main --config=configs/300w_kdloss_teacher_tolerant.py --workdir=workdirs/300w_kdloss_teacher_tolerant
"""

from configs import kdloss


def get_config():
    return kdloss.experiment("300w", "student")
