"""What the one loop (`fan_jax.train`) trains: a task per kind of run.

A `Task` is the network, its init, its pure step and its landmark kind; the loop owns the
mesh, the state, the data, checkpoints, logging and evaluation. The tasks:

  heatmap   MobileFAN or a teacher on heatmap MSE; with `distill.enabled`, plus FA / FS
            against a frozen heatmap teacher (`fan_jax.tasks.heatmap`);
  kdloss    KD-Loss (`model.kind='regression'`): the Tough or Tolerant teacher, or the
            student against both frozen teachers (`fan_jax.tasks.kdloss`).

What both share (the `Task` record, `label`, `run_once`) is `fan_jax.tasks.base`, which the
task modules import and this package re-exports.

Every step has the signature `step(state, frozen, batch, rng) -> (state, metrics)`; `frozen`
holds the teachers' variables (an empty tuple when there is none). It is an argument of the
jitted step, never part of the trained state.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from fan_jax.tasks.base import PyTree, Source, Task, is_regression, label, run_once  # noqa: F401


def preflight(config: ml_collections.ConfigDict) -> None:
    """Cheap checks (no JAX) that fail before any dataset is built: the teachers exist."""
    if is_regression(config):
        from fan_jax.tasks import kdloss

        kdloss.preflight(config)
    elif config.distill.enabled:
        from fan_jax.tasks import heatmap

        heatmap.teacher_record(config)


def build(
    config: ml_collections.ConfigDict,
    workdir: str,
    train_source: Source,
    num_landmarks: int,
    steps_per_epoch: int,
    sharding: Any,
) -> Task:
    """The task `config` names; teachers are loaded onto `sharding` (replicated)."""
    if is_regression(config):
        from fan_jax.tasks import kdloss

        return kdloss.build(config, workdir, train_source, num_landmarks, steps_per_epoch, sharding)
    from fan_jax.tasks import heatmap

    return heatmap.build(config, num_landmarks, steps_per_epoch, sharding)
