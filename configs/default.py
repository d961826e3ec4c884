"""Default config: the paper's recipe (MobileFAN on WFLW, no distillation).

Every experiment file in this folder starts from `get_config()` and changes a few fields
with `experiment(...)`. Override any field on the command line, e.g.
`--config.train.batch_size=32 --config.distill.fs_layers='(False,True,True)'`; the config
is locked, so a misspelt field is an error, not a silent no-op.
"""

import ml_collections

# Per dataset: distillation weight (paper section 4.2), face box source, validation split
# (these benchmarks have no separate validation set: the main test split ranks "best").
DATASET_DEFAULTS = {
    "wflw": dict(lam=1e-4, box_source="dataset", val_split="test"),
    # 300W ships no boxes; the toolkits (and the stored 'box') use the landmark box.
    "300w": dict(lam=1e-4, box_source="landmarks", val_split="full"),
    # COFW ships boxes, but the public MobileFAN code crops from the landmark box.
    "cofw": dict(lam=1e-2, box_source="landmarks", val_split="test"),
}


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = (
        "train"  # 'train' (then a final evaluation) | 'eval' (evaluate the workdir's checkpoint)
    )
    c.seed = 0

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "wflw"  # 'wflw' | '300w' | 'cofw'
    c.dataset.data_dir = ""  # TFDS data dir; '' -> TFDS default (~/tensorflow_datasets)
    c.dataset.manual_dir = ""  # downloaded files; '' -> <data_dir>/downloads/manual
    c.dataset.prepare = True  # build the TFDS dataset from manual_dir when it is missing
    c.dataset.num_workers = 0  # grain worker processes (0: threads in the main process)
    c.dataset.val_split = "test"

    # Crop side; heatmaps are input_size / 4. Any multiple of 32 works (tests use 64).
    c.input_size = 256
    c.sigma = 1.0  # Gaussian target sigma in heatmap pixels (public code: 1)

    c.augment = ml_collections.ConfigDict()
    c.augment.box_source = "dataset"  # 'dataset' box | 'landmarks' (tight landmark box)
    c.augment.box_scale = 1.25
    c.augment.p_rotate = 0.6  # the public code's probability; the paper states none
    c.augment.max_rotation_deg = 30.0
    c.augment.scale_range = (0.75, 1.25)
    c.augment.p_flip = 0.5
    c.augment.photometric = False

    c.model = ml_collections.ConfigDict()
    c.model.kind = (
        "heatmap"  # 'heatmap' (fan_jax.train) | 'regression' (KD-Loss, fan_jax.tasks.kdloss)
    )
    c.model.name = "mobilefan"  # fan_jax.models.fan.build_model: mobilefan | mobilefan_0.5 | teacher | resnet18_fan
    # Keras ImageNet weight file (.h5 / .keras, MobileNetV2 or ResNet50 'no top') for the
    # encoder; '' trains from scratch.
    c.model.pretrained = ""

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8  # global, over all devices and hosts
    c.train.num_epochs = 80
    c.train.num_train_steps = -1  # > 0 overrides num_epochs
    c.train.learning_rate = 1e-3
    c.train.lr_decay_epochs = (30, 50)  # x lr_decay_factor at each
    c.train.lr_decay_factor = 0.1
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8  # PyTorch's and optax's default (the paper states none)
    c.train.warmup_steps = 0  # linear learning-rate warm-up from 0 (the paper has none)
    # 'bfloat16': convolutions and matmuls in bf16 (GPU/TPU); parameters, optimizer state,
    # BN statistics and losses stay float32 (fan_jax/steps.py). On CPUs, bf16 is slower.
    c.train.compute_dtype = "float32"
    c.train.log_every_steps = 50
    c.train.eval_every_steps = 0  # validation NME (ranks "best"); 0: once per epoch; -1: never
    c.train.checkpoint_every_steps = 0  # 0: once per epoch
    c.train.keep_checkpoints = 3  # the latest few, plus the best by validation NME
    c.train.nan_at_step = -1  # test hook: poison the batch of this step with NaN
    # Rerunning a workdir with other settings than its record (config.json) is an error
    # unless this is set; fields that define the model or the data can never change.
    c.train.allow_changes = False

    c.distill = ml_collections.ConfigDict()
    c.distill.enabled = False
    c.distill.teacher_workdir = ""  # the teacher run's --workdir (its best checkpoint is used)
    c.distill.teacher_config = ""  # the config that trains that teacher, named in errors
    # Which teacher checkpoint: 'latest' | 'best' (by its validation NME, which is a test
    # split on these benchmarks) | a step number as a string.
    c.distill.teacher_checkpoint = "latest"
    c.distill.lam = 1e-4
    c.distill.fa_layers = (True, True, True)  # FA1..FA3 on/off (paper Table 6 ablation)
    c.distill.fs_layers = (True, True, True)  # FS1..FS3 on/off
    c.distill.fs_form = "gram"  # 'gram' (fast, exact) | 'direct' (N x N reference) | 'public'
    c.distill.adapter_kind = "conv"  # paper: 1x1 conv | 'conv_bn_relu' (public code)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 32
    c.eval.flip_test = True  # also report flip-test (image + mirror averaged)
    c.eval.normalizer = "inter_ocular"  # | 'inter_pupil'
    c.eval.splits = ()  # () -> every test split of the dataset
    # Checkpoint scored by the final evaluation and by eval mode: 'latest' | 'best' (lowest
    # validation NME; the validation split is a test split here, so 'best' is optimistic)
    # | a step number as a string.
    c.eval.checkpoint = "latest"
    return c


def experiment(
    dataset: str, model: str = "mobilefan", distill: bool = False, teacher_config: str | None = None
) -> ml_collections.ConfigDict:
    """The paper's recipe for one dataset and model; distill=True adds the teacher of `dataset`."""
    c = get_config()
    d = DATASET_DEFAULTS[dataset]
    c.dataset.name = dataset
    c.dataset.val_split = d["val_split"]
    c.augment.box_source = d["box_source"]
    c.model.name = model
    c.distill.lam = d["lam"]
    if distill:
        c.distill.enabled = True
        c.distill.teacher_workdir = f"workdirs/{dataset}_teacher"
        c.distill.teacher_config = teacher_config or f"configs/{dataset}_teacher.py"
    return c
