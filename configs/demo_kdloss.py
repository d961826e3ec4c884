"""KD-Loss demo on synthetic 68-point faces: Tough and Tolerant teachers, then the student.

  python -m fan_jax.main --config=configs/demo_kdloss.py --workdir=/tmp/demo_kdloss --mode=demo

Small everything (64px crops, EfficientNet-B0 teachers, 200 steps each) so the three runs fit
a few minutes of CPU, most of it XLA compiling the three train steps (measured on a shared,
loaded 2-core machine: ~180 s to compile the B0 teacher step, ~95 s the student step, then
0.33 s / 0.52 s per step). The numbers show the pipeline works, not the paper's accuracy.
`fan_jax.demo.kdloss_rows` gives the rows for a combined table with the heatmap demo.
"""

import ml_collections

from configs import kdloss


def get_config():
    c = kdloss.experiment("300w", "student")
    c.mode = "demo"
    c.dataset.prepare = False
    c.dataset.val_split = "test"
    c.augment.box_source = "landmarks"
    c.input_size = 64
    c.kd.teacher_model = "efficientnet_b0_reg"
    c.train.batch_size = 16
    c.train.num_train_steps = 200
    c.train.lr_schedule = "inverse_time"
    c.train.lr_inverse_time_decay = 1e-3
    c.train.log_every_steps = 50
    c.train.eval_every_steps = -1  # the final evaluation only
    c.train.checkpoint_every_steps = 100
    c.eval.batch_size = 32
    c.eval.checkpoint = "latest"

    c.demo = ml_collections.ConfigDict()
    c.demo.num_train = 400
    c.demo.num_test = 100
    c.demo.image_size = 128
    return c
