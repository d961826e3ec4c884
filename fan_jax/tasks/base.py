"""What every task shares (`fan_jax.tasks`): the `Task` record, its label, and `run_once`
for the one-off jitted inits. The task modules import this, not the package, so the package
can dispatch to them without an import cycle."""

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


# Init runs once, but its hundreds of RNG draws take XLA's CPU backend longer to optimise
# than the train step; unoptimised code is as correct and compiles in half the time.
_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_once(fn: Callable, *args: Any) -> Any:
    """jit(fn)(*args), compiled without XLA's expensive optimisations."""
    lowered = jax.jit(fn).lower(*args)
    try:
        # XLA takes int option values; jax annotates the dict as str | bool only.
        compiled = lowered.compile(_RUN_ONCE_OPTIONS)  # type: ignore[arg-type]
    except Exception:
        compiled = lowered.compile()
    return compiled(*args)
