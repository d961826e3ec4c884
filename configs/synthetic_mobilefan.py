"""MobileFAN on synthetic faces: is the generator learnable? (held-out NME after training)

  python -m fan_jax.synthetic_300w --out /tmp/synth --num_train 3000 --num_test 300 --size 160 --workers 2
  python -m fan_jax.main --config=configs/synthetic_mobilefan.py --workdir=/tmp/synth_mobilefan \
      --config.dataset.manual_dir=/tmp/synth --config.dataset.data_dir=/tmp/synth_tfds

The tree is built with the real 300W builder, so its own data_dir keeps it apart from a real
300W build. 128x128 crops (32x32 heatmaps) and 2,500 steps keep it to about 20 CPU-minutes;
on a GPU use --config.input_size=256 and more steps.
"""

from configs import default


def get_config():
    c = default.experiment("300w", "mobilefan")
    c.dataset.val_split = "full"
    c.input_size = 128
    c.sigma = 1.5
    c.augment.box_source = "landmarks"
    c.train.batch_size = 8
    c.train.num_train_steps = 2500
    c.train.learning_rate = 2e-3
    c.train.lr_decay_epochs = (5,)  # 375 steps per epoch: x0.1 for the last quarter
    c.train.log_every_steps = 100
    c.train.eval_every_steps = -1  # the final evaluation only
    c.train.checkpoint_every_steps = 500
    c.eval.checkpoint = "latest"
    return c
