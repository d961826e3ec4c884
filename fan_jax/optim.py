"""The optimizer every task trains with: Adam on one learning-rate schedule."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax


def make_optimizer(
    config: Any, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam and its schedule (`train.lr_schedule`):
    'piecewise'     x lr_decay_factor at each of `lr_decay_epochs` (the paper: 30 and 50),
                    counted from the end of the warm-up;
    'inverse_time'  lr / (1 + lr_inverse_time_decay * step) (Keras's legacy `decay`, the
                    KD-Loss public code).
    Either is scaled by a linear warm-up from 0 over the first `warmup_steps`.
    """
    t = config.train
    kind = t.get("lr_schedule", "piecewise")
    eps = t.get("adam_eps", 1e-8)
    if kind == "inverse_time":
        lr, decay = float(t.learning_rate), float(t.lr_inverse_time_decay)
        schedule = lambda step: lr / (1.0 + decay * step)  # noqa: E731
    elif kind == "piecewise":
        boundaries = {int(round(e * steps_per_epoch)): t.lr_decay_factor for e in t.lr_decay_epochs}
        schedule = optax.piecewise_constant_schedule(t.learning_rate, boundaries)
    else:
        raise ValueError(f"train.lr_schedule must be 'inverse_time' or 'piecewise', got {kind!r}")
    warmup = int(t.get("warmup_steps", 0))
    if warmup > 0 and kind == "piecewise":
        # The decay boundaries count from the end of the warm-up.
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, t.learning_rate, warmup), schedule], [warmup]
        )
    elif warmup > 0:
        # The inverse-time decay counts from the first step, warm-up included.
        decayed = schedule
        schedule = lambda step: jnp.minimum(step / warmup, 1.0) * decayed(step)  # noqa: E731
    return optax.adam(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=eps), schedule
