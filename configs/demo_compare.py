"""Both distillation methods in one table: the heatmap demo plus KD-Loss on the same faces.

  python -m fan_jax.main --config=configs/demo.py --workdir=workdirs/demo          # ~7 min
  python -m fan_jax.main --config=configs/demo_compare.py --workdir=workdirs/demo  # ~8 min more

The second command finds the teacher, MobileFAN and MobileFAN + KD finished in the workdir
(it re-evaluates them from their checkpoints), trains the KD-Loss Tough and Tolerant
teachers, the MobileNetV2 regression student alone and the same student with KD-Loss
(configs/demo_kdloss.py: their trunks start from the heatmap runs') on the same synthetic 300W
data, and prints one table with all seven models. On an empty workdir it does everything in
one go (about 18 minutes on a 2-core CPU).
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.demo.kdloss_enabled = True
    return c
