"""Proxy of the paper's Tables 5 and 6 on synthetic 300W faces (benchmarks/proxy.py reads it).

  python benchmarks/proxy.py --out /tmp/fan_proxy

The base config every row starts from; `proxy.*` sets the sizes and the rows' shared
schedule. Where it departs from the paper's recipe (configs/300w_*.py), it does so to fit a
2-core CPU in under 2 hours:
- 128x128 crops (32x32 heatmaps, sigma 1.5) instead of 256x256, and 3,000
  synthetic faces instead of 3,148 photos;
- a few hundred steps instead of 80 epochs: lr 5e-3 after a 50-step warm-up, x0.1 for the
  last fifth (the paper: 1e-3, x0.1 at epochs 30 and 50; at 1e-3 the short runs end
  under-trained);
- everything else is the paper's: the ResNet-50 teacher, FA as 1x1 conv adapters, FS on the
  raw taps, lambda = 1e-4 (300W), Adam, the augmentation.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.experiment("300w", "mobilefan")
    c.dataset.data_dir = ""  # '' -> <out>/tensorflow_datasets
    c.dataset.manual_dir = ""  # '' -> <out>/synthetic_300w (drawn on the first run)
    c.input_size = 128
    c.sigma = 1.5

    c.train.batch_size = 8
    c.train.learning_rate = 5e-3
    c.train.warmup_steps = 50
    c.train.log_every_steps = 100
    c.train.eval_every_steps = -1  # the final evaluation only
    c.train.checkpoint_every_steps = 200
    c.train.keep_checkpoints = 1
    c.eval.batch_size = 32

    c.proxy = ml_collections.ConfigDict()
    c.proxy.num_train = 3000
    c.proxy.num_test = 300
    c.proxy.image_size = 160  # side of the drawn images; faces are cropped from them
    c.proxy.teacher_model = "teacher"  # the paper's ResNet-50
    c.proxy.teacher_steps = 1000
    c.proxy.student_model = "mobilefan"
    c.proxy.half_model = "mobilefan_0.5"
    c.proxy.student_steps = 500
    c.proxy.decay_at = 0.8  # fraction of each run's steps after which lr is x0.1
    c.proxy.seeds = 3  # the KD / no-KD pairs
    c.proxy.single_term_seeds = 1  # + FA alone, + FS alone
    c.proxy.ablation = False  # also FA1 / FA2 / FA3 / FS1 / FS2 / FS3 alone (one seed each)
    return c
