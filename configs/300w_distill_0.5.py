"""MobileFAN (0.5) + KD on 300W: FA1-3 and FS1-3 from the frozen teacher.

Train the teacher first:
  python -m fan_jax.main --config=configs/300w_teacher.py --workdir=workdirs/300w_teacher
"""

from configs import default


def get_config():
    return default.experiment("300w", "mobilefan_0.5", distill=True)
