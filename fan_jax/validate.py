"""Config validation, once, before a run reads or writes anything.

`check` collects every problem (one line each, naming the dotted field and what is allowed)
and raises one ConfigError, so a user fixes all of them in one go.
"""

from __future__ import annotations

import numbers

import ml_collections

from fan_jax.errors import ConfigError

_FS_FORMS = ("gram", "direct", "public")
_ADAPTERS = ("conv", "conv_bn_relu")
_NORMALIZERS = ("inter_ocular", "inter_pupil")


def _num(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def problems(config: ml_collections.ConfigDict, num_devices: int = 1) -> list[str]:
    """Every invalid value in `config`, as 'field: what is wrong' lines."""
    out: list[str] = []
    c, t = config, config.train

    def need(cond: bool, msg: str) -> None:
        if not cond:
            out.append(msg)

    def positive_int(field: str, v) -> None:
        need(
            isinstance(v, int) and not isinstance(v, bool) and v > 0,
            f"{field}: must be a positive integer, got {v!r}",
        )

    def probability(field: str, v) -> None:
        need(_num(v) and 0.0 <= v <= 1.0, f"{field}: must be a probability in [0, 1], got {v!r}")

    from fan_jax import data

    need(
        c.dataset.name in data.DATASETS,
        f"dataset.name: {c.dataset.name!r} is not one of {sorted(data.DATASETS)}",
    )
    need(
        isinstance(c.input_size, int) and c.input_size >= 32 and c.input_size % 32 == 0,
        f"input_size: must be a positive multiple of 32 (the encoders' stride), got "
        f"{c.input_size!r}",
    )
    need(_num(c.sigma) and c.sigma > 0, f"sigma: must be > 0, got {c.sigma!r}")

    positive_int("train.batch_size", t.batch_size)
    if isinstance(t.batch_size, int) and t.batch_size > 0 and t.batch_size % num_devices:
        out.append(
            f"train.batch_size: {t.batch_size} is not divisible by the {num_devices} "
            f"devices of the mesh (the global batch is split evenly over them)"
        )
    positive_int("eval.batch_size", c.eval.batch_size)
    need(
        _num(t.learning_rate) and t.learning_rate >= 0,
        f"train.learning_rate: must be >= 0, got {t.learning_rate!r}",
    )
    need(
        isinstance(t.num_train_steps, int) and (t.num_train_steps > 0 or t.num_train_steps == -1),
        f"train.num_train_steps: must be > 0, or -1 to use train.num_epochs, got "
        f"{t.num_train_steps!r}",
    )
    if t.num_train_steps == -1:
        positive_int("train.num_epochs", t.num_epochs)
    positive_int("train.log_every_steps", t.log_every_steps)
    positive_int("train.keep_checkpoints", t.keep_checkpoints)
    for field in ("eval_every_steps", "checkpoint_every_steps"):
        v = t[field]
        need(
            isinstance(v, int) and v >= -1,
            f"train.{field}: must be > 0, 0 (once per epoch) or -1 (never), got {v!r}",
        )
    if "warmup_steps" in t:
        need(
            isinstance(t.warmup_steps, int) and t.warmup_steps >= 0,
            f"train.warmup_steps: must be an integer >= 0, got {t.warmup_steps!r}",
        )
    if "compute_dtype" in t:
        need(
            t.compute_dtype in ("float32", "bfloat16"),
            f"train.compute_dtype: must be 'float32' or 'bfloat16', got {t.compute_dtype!r}",
        )
    if "lr_decay_factor" in t:
        need(
            _num(t.lr_decay_factor) and t.lr_decay_factor > 0,
            f"train.lr_decay_factor: must be > 0, got {t.lr_decay_factor!r}",
        )
    for field in ("adam_b1", "adam_b2"):
        if field in t:
            need(
                _num(t[field]) and 0 <= t[field] < 1,
                f"train.{field}: must be in [0, 1), got {t[field]!r}",
            )

    a = c.augment
    probability("augment.p_rotate", a.p_rotate)
    probability("augment.p_flip", a.p_flip)
    need(
        _num(a.box_scale) and a.box_scale > 0,
        f"augment.box_scale: must be > 0, got {a.box_scale!r}",
    )
    need(
        _num(a.max_rotation_deg) and 0 <= a.max_rotation_deg <= 180,
        f"augment.max_rotation_deg: must be in [0, 180], got {a.max_rotation_deg!r}",
    )
    sr = tuple(a.scale_range) if isinstance(a.scale_range, (tuple, list)) else None
    need(
        sr is not None and len(sr) == 2 and all(_num(x) for x in sr) and 0 < sr[0] <= sr[1],
        f"augment.scale_range: must be (low, high) with 0 < low <= high, got {a.scale_range!r}",
    )
    need(
        a.box_source in ("dataset", "landmarks"),
        f"augment.box_source: must be 'dataset' or 'landmarks', got {a.box_source!r}",
    )

    if c.model.get("kind", "heatmap") == "heatmap":
        from fan_jax.models import fan

        need(
            c.model.name in fan.MODELS,
            f"model.name: unknown model {c.model.name!r}; expected one of {sorted(fan.MODELS)}",
        )
        d = c.distill
        for field in ("fa_layers", "fs_layers"):
            v = d[field]
            need(
                isinstance(v, (tuple, list))
                and len(v) == 3
                and all(isinstance(x, bool) for x in v),
                f"distill.{field}: must be 3 booleans (FA1..FA3 / FS1..FS3 on or off), got {v!r}",
            )
        need(_num(d.lam) and d.lam >= 0, f"distill.lam: must be >= 0, got {d.lam!r}")
        need(
            d.fs_form in _FS_FORMS,
            f"distill.fs_form: must be one of {_FS_FORMS}, got {d.fs_form!r}",
        )
        need(
            d.adapter_kind in _ADAPTERS,
            f"distill.adapter_kind: must be one of {_ADAPTERS}, got {d.adapter_kind!r}",
        )
    elif c.model.kind != "regression":
        out.append(f"model.kind: must be 'heatmap' or 'regression', got {c.model.kind!r}")

    e = c.eval
    need(
        e.normalizer in _NORMALIZERS,
        f"eval.normalizer: must be one of {_NORMALIZERS}, got {e.normalizer!r}",
    )
    ck = str(e.checkpoint)
    need(
        ck in ("latest", "best") or ck.isdigit(),
        f"eval.checkpoint: must be 'latest', 'best' or a step number, got {e.checkpoint!r}",
    )
    return out


def check(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raises ConfigError listing every problem of `config`."""
    found = problems(config, num_devices)
    if found:
        raise ConfigError(found)
