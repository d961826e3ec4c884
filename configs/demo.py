"""The whole pipeline on synthetic faces, on a CPU, in minutes (the README's first command).

  python -m fan_jax.main --config=configs/demo.py --workdir=/tmp/fan_demo

Draws 300W-layout synthetic faces (fan_jax.synthetic), builds them with the real 300W TFDS
builder, trains a teacher, MobileFAN, and MobileFAN + KD (FA1-3 + FS1-3 from that teacher),
evaluates all three on the common / challenging / full splits with and without flip-test,
prints the table and writes plots.

Scaled down to fit a 2-core CPU, so the numbers show the pipeline works, not the paper's
accuracy: 128x128 crops (32x32 heatmaps) instead of 256x256, a ResNet-18 teacher instead of
ResNet-50, a few hundred steps instead of 80 epochs. At 128x128 one heatmap pixel is about a
tenth of the inter-ocular distance, which bounds how low the NME can go.
"""

import ml_collections

from configs import default


def get_config():
    c = default.experiment("300w", "mobilefan")
    c.mode = "demo"
    c.dataset.data_dir = ""  # '' -> <workdir>/tensorflow_datasets
    c.dataset.manual_dir = ""  # '' -> <workdir>/synthetic_300w (drawn on the first run)
    c.input_size = 128
    c.augment.box_source = "landmarks"

    c.train.batch_size = 16
    c.train.learning_rate = 2e-3
    # Per stage step counts are in c.demo; decay late in the student runs (in epochs of
    # num_train / batch_size = 40 steps).
    c.train.lr_decay_epochs = (5, 6)
    c.train.log_every_steps = 25
    c.train.eval_every_steps = -1  # the final evaluation only
    c.train.checkpoint_every_steps = 100
    c.train.keep_checkpoints = 1

    c.distill.lam = 1e-4

    c.eval.batch_size = 32
    c.eval.checkpoint = "latest"

    c.demo = ml_collections.ConfigDict()
    c.demo.num_train = 640
    c.demo.num_test = 120
    c.demo.image_size = 160  # side of the drawn images; faces are cropped from them
    c.demo.teacher_model = "resnet18_fan"
    c.demo.teacher_steps = 200
    c.demo.student_steps = 240
    return c
