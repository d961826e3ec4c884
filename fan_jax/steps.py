"""Pure training steps of the heatmap task (jit them with shardings in train.py).

Every function here is a pure function of arrays: the models, the optimizer and the
loss settings are bound with `functools.partial` before `jax.jit`, so the same step runs
on one CPU, on the 8 cores of a TPU host or across hosts; only the shardings change.

State layout. `TrainState.params` is `{'student': ..., 'adapters': ...}` ('adapters'
only when distilling with an FA term) and `batch_stats` mirrors it: the adapters train with the student
(they share the optimizer) but live in their own subtree, so exporting the student drops
them by dropping a key. The teacher's variables are never part of the state: they are a
separate argument of `distill_step`, applied with `train=False` behind `stop_gradient`.

Mixed precision (`compute_dtype='bfloat16'`, config `train.compute_dtype`): the step casts
a bfloat16 copy of the parameters and images, so every convolution and matmul runs in
bfloat16, while the parameters, their gradients, the optimizer state and the BN statistics
stay float32 (BN reduces in float32), and the losses cast their inputs to float32 (the FS
Gram sums accumulate in float32 at HIGHEST precision). bfloat16 has float32's exponent
range, so no loss scaling is needed.

Batches hold 'image' [B, H, W, 3] (uint8 from the input pipeline, normalised here on
device; float32 is taken as already normalised) and 'landmarks' [B, L, 2] in crop pixel
coordinates. Heatmap targets are rendered here, on device: at 64x64xL float32 they
are larger than the image, so they never cross the host boundary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from fan_jax import heatmaps, losses
from fan_jax.landmarks import prepare_images

PyTree = Any
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree, checkpointed as is."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str) -> Any:
    """The jnp dtype of a `train.compute_dtype` name ('float32' or 'bfloat16')."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"train.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}"
        )
    return COMPUTE_DTYPES[name]


def cast_floating(tree: PyTree, dtype: Any) -> PyTree:
    """`tree` with its floating leaves in `dtype` (a no-op for float32)."""
    if dtype == jnp.float32:
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def params_in(variables: PyTree, dtype: Any) -> PyTree:
    """Flax variables with their 'params' cast to `dtype` (the BN statistics stay float32)."""
    return dict(variables, params=cast_floating(variables["params"], dtype))


def create_train_state(
    params: PyTree, batch_stats: PyTree, tx: optax.GradientTransformation
) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
    )


def render_targets(
    landmarks: jax.Array, image_size: int, heatmap_size: int, sigma: float
) -> jax.Array:
    """Gaussian targets [B, h, h, L] for crop-pixel landmarks [B, L, 2]."""
    stride = image_size / heatmap_size
    return heatmaps.render_gaussians(
        heatmaps.to_heatmap_coords(landmarks, stride=stride), size=heatmap_size, sigma=sigma
    )


def _student_forward(
    model: nn.Module, params: PyTree, batch_stats: PyTree, images: jax.Array, rng: jax.Array
) -> tuple[jax.Array, Any, PyTree]:
    # Parameters are cast to the images' dtype (float32 master weights; gradients flow back
    # through the cast in float32). BN statistics stay float32.
    (hm, taps), new_vars = model.apply(
        {"params": cast_floating(params, images.dtype), "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": rng},
    )
    return hm, taps, new_vars["batch_stats"]


def apply_gradients(
    state: TrainState, grads: PyTree, new_batch_stats: PyTree, tx: optax.GradientTransformation
) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # flax.struct dataclasses are dataclasses: .replace is dataclasses.replace, typed.
    return dataclasses.replace(
        state,
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=new_batch_stats,
        opt_state=opt_state,
    )


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    sigma: float = 1.0,
    compute_dtype: str = "float32",
) -> tuple[TrainState, Metrics]:
    """One Adam step on the heatmap MSE; returns the new state and {'loss', 'heatmap'}."""
    images = prepare_images(batch["image"]).astype(dtype_of(compute_dtype))
    landmarks = batch["landmarks"]
    # Unused by today's models (no dropout); folded per step so adding a stochastic layer
    # keeps runs reproducible and resumable.
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params: PyTree) -> tuple[jax.Array, Any]:
        hm, _, new_bs = _student_forward(
            model, params["student"], state.batch_stats["student"], images, rng
        )
        targets = render_targets(landmarks, images.shape[1], hm.shape[1], sigma)
        loss = losses.heatmap_mse(hm, targets)
        return loss, ({"student": new_bs}, {"loss": loss, "heatmap": loss})

    grads, (new_bs, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    return apply_gradients(state, grads, new_bs, tx), metrics


def distill_step(
    state: TrainState,
    teacher_variables: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    model: nn.Module,
    adapters: nn.Module | None,
    teacher: nn.Module,
    tx: optax.GradientTransformation,
    sigma: float = 1.0,
    lam: float = 1e-4,
    fa_layers: Sequence[bool] = (True, True, True),
    fs_layers: Sequence[bool] = (True, True, True),
    fs_form: str = "gram",
    compute_dtype: str = "float32",
) -> tuple[TrainState, Metrics]:
    """One step of L = L_hm + lam * sum_r (FA_r + FS_r) against a frozen teacher.

    The teacher runs in inference mode (running BN statistics) and its outputs pass
    through `stop_gradient`: it is an input of the step, not a parameter of it.
    `adapters` is None when no FA term is enabled (then params has no 'adapters').
    Returns the new state and {'loss', 'heatmap', 'fa1'.., 'fs1'..} (enabled terms only).
    """
    dtype = dtype_of(compute_dtype)
    images = prepare_images(batch["image"]).astype(dtype)
    landmarks = batch["landmarks"]
    rng = jax.random.fold_in(rng, state.step)
    _, teacher_taps = teacher.apply(params_in(teacher_variables, dtype), images, train=False)
    teacher_taps = jax.lax.stop_gradient(tuple(teacher_taps))

    def loss_fn(params: PyTree) -> tuple[jax.Array, Any]:
        hm, taps, new_bs = _student_forward(
            model, params["student"], state.batch_stats["student"], images, rng
        )
        new_batch_stats = {"student": new_bs}
        adapted = None
        if adapters is not None:
            adapter_vars = {"params": cast_floating(params["adapters"], dtype)}
            if "adapters" in state.batch_stats:  # only the conv_bn_relu kind has BN
                adapter_vars["batch_stats"] = state.batch_stats["adapters"]
            adapted, new_adapter_vars = adapters.apply(
                adapter_vars, taps, train=True, mutable=["batch_stats"]
            )
            if "adapters" in state.batch_stats:
                new_batch_stats["adapters"] = new_adapter_vars["batch_stats"]
        targets = render_targets(landmarks, images.shape[1], hm.shape[1], sigma)
        hm_loss = losses.heatmap_mse(hm, targets)
        terms = losses.distillation_terms(
            taps,
            adapted,
            teacher_taps,
            fa_layers=tuple(fa_layers),
            fs_layers=tuple(fs_layers),
            fs_form=fs_form,
        )
        loss = losses.total_loss(hm_loss, terms, lam)
        return loss, (new_batch_stats, {"loss": loss, "heatmap": hm_loss, **terms})

    grads, (new_bs, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    return apply_gradients(state, grads, new_bs, tx), metrics
