"""MobileFAN (0.5) + KD on COFW: FA1-3 and FS1-3 from the frozen teacher.

Train the teacher first:
  python -m fan_jax.main --config=configs/cofw_teacher.py --workdir=workdirs/cofw_teacher
"""

from configs import default


def get_config():
    return default.experiment("cofw", "mobilefan_0.5", distill=True)
