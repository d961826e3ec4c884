"""MobileFAN + KD on WFLW: FA1-3 and FS1-3 from the frozen teacher.

Train the teacher first:
  python -m fan_jax.main --config=configs/wflw_teacher.py --workdir=workdirs/wflw_teacher
"""

from configs import default


def get_config():
    return default.experiment("wflw", "mobilefan", distill=True)
