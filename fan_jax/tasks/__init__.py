"""What the one loop (`fan_jax.train`) trains: a task per kind of run.

A `Task` is the network, its init, its pure step and its landmark kind; the loop owns the
mesh, the state, the data, checkpoints, logging and evaluation. The tasks:

  heatmap   MobileFAN or a teacher on heatmap MSE; with `distill.enabled`, plus FA / FS
            against a frozen heatmap teacher (`fan_jax.tasks.heatmap`);
  kdloss    KD-Loss (`model.kind='regression'`): the Tough or Tolerant teacher, or the
            student against both frozen teachers (`fan_jax.tasks.kdloss`).

Every step has the signature `step(state, frozen, batch, rng) -> (state, metrics)`; `frozen`
holds the teachers' variables (an empty tuple when there is none). It is an argument of the
jitted step, never part of the trained state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import optax

PyTree = Any
Source = Sequence[Mapping[str, Any]]


@dataclasses.dataclass
class Task:
    kind: str  # the landmarks kind (fan_jax.landmarks): 'heatmap' | 'regression'
    model: Any  # the trained network: the 'student' subtree of the state
    label: str  # tables and plot titles
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init: Callable[[jax.Array], tuple[PyTree, PyTree]]  # rng -> (params, batch_stats)
    step: Callable  # pure: (state, frozen, batch, rng) -> (state, metrics)
    frozen: PyTree = ()


def is_regression(config: ml_collections.ConfigDict) -> bool:
    """Whether `config` trains a KD-Loss regression network."""
    model = config.get("model", None)
    return model is not None and model.get("kind", "heatmap") == "regression"


def label(config: ml_collections.ConfigDict) -> str:
    """'mobilefan', 'mobilefan+KD', 'kdloss_student', ... for tables and plot titles."""
    if is_regression(config):
        return f"kdloss_{config.kd.role}"
    return config.model.name + ("+KD" if config.distill.enabled else "")


def preflight(config: ml_collections.ConfigDict) -> None:
    """Cheap checks (no JAX) that fail before any dataset is built: the teachers exist."""
    if is_regression(config):
        from fan_jax.tasks import kdloss

        kdloss.preflight(config)
    elif config.distill.enabled:
        from fan_jax.tasks import heatmap

        heatmap.teacher_record(config)


def build(config: ml_collections.ConfigDict, workdir: str, train_source: Source,
          num_landmarks: int, steps_per_epoch: int, sharding: Any) -> Task:
    """The task `config` names; teachers are loaded onto `sharding` (replicated)."""
    if is_regression(config):
        from fan_jax.tasks import kdloss

        return kdloss.build(config, workdir, train_source, num_landmarks, steps_per_epoch,
                            sharding)
    from fan_jax.tasks import heatmap

    return heatmap.build(config, num_landmarks, steps_per_epoch, sharding)


# Init runs once, but its hundreds of RNG draws take XLA's CPU backend longer to optimise
# than the train step; unoptimised code is as correct and compiles in half the time.
_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_once(fn: Callable, *args: Any) -> Any:
    """jit(fn)(*args), compiled without XLA's expensive optimisations."""
    lowered = jax.jit(fn).lower(*args)
    try:
        compiled = lowered.compile(_RUN_ONCE_OPTIONS)
    except Exception:  # noqa: BLE001  (a backend without these options: compile as usual)
        compiled = lowered.compile()
    return compiled(*args)
