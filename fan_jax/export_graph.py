"""The function an export serialises: a batch of face crops (0..255 RGB) -> heatmaps and
landmarks, with the student's variables closed over and its convolutions in XLA's native form
(what every converter understands). `fan_jax.export` writes it to each format.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fan_jax import landmarks
from fan_jax.checkpoints import student_variables
from fan_jax.exported import OUTPUT_NAMES


def decode_landmarks(hm: jax.Array, stride: float = 4.0) -> jax.Array:
    """`heatmaps.decode` + `from_heatmap_coords`, written for exporters and quantizers.

    Equal to the reference in float. Everything up to the last add is integer: the position
    in quarter heatmap pixels q = 4 * argmax + sign step, and the crop coordinate is
    q * stride / 4 + (stride / 2 - 0.5). An int8 TFLite model then quantizes only that
    last add (error < 0.15 crop px) instead of every step of the float arithmetic (which
    moved points by more than half a heatmap pixel). jnp's integer `//` and `%` lower
    through a remainder that jax2onnx cannot shape with a symbolic batch; argmax indices
    are non-negative, so truncating division is the same.
    """
    b, h, w, n = hm.shape
    flat = jnp.moveaxis(hm, -1, 1).reshape(b, n, h * w)
    idx = jnp.argmax(flat, axis=-1).astype(jnp.int32)
    y = jax.lax.div(idx, jnp.int32(w))
    x = idx - y * w

    def value_at(yy: jax.Array, xx: jax.Array) -> jax.Array:
        j = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
        return jnp.take_along_axis(flat, j[..., None], axis=-1)[..., 0]

    def step(
        hi: jax.Array, lo: jax.Array
    ) -> jax.Array:  # sign(hi - lo) as int32, without float arithmetic
        return (hi > lo).astype(jnp.int32) - (hi < lo).astype(jnp.int32)

    sx = jnp.where((x > 0) & (x < w - 1), step(value_at(y, x + 1), value_at(y, x - 1)), 0)
    sy = jnp.where((y > 0) & (y < h - 1), step(value_at(y + 1, x), value_at(y - 1, x)), 0)
    q = jnp.stack([4 * x + sx, 4 * y + sy], axis=-1)
    scale = float(stride) / 4.0
    if scale.is_integer():
        q = q * int(scale)
        return q.astype(jnp.float32) + jnp.float32(stride / 2.0 - 0.5)
    return q.astype(jnp.float32) * jnp.float32(scale) + jnp.float32(stride / 2.0 - 0.5)


def _native_convs(next_fun: Callable, args: tuple, kwargs: dict[str, Any], context: Any) -> Any:
    """Runs `layers.DepthwiseConv`, `layers.PointwiseConv` and `layers.PatchConv` as `lax`
    convolutions with their own parameters.

    The training layers write depthwise convs as k*k shifted slices, 1x1 convs as reshaped
    matmuls and the stem as a space-to-depth patch matmul (fast for XLA:CPU); exported as
    such, TFLite and onnxruntime run many small ops per layer instead of their native
    (grouped) CONV kernels.
    """
    from fan_jax.models import layers

    module = context.module
    if context.method_name != "__call__" or not isinstance(
        module, (layers.DepthwiseConv, layers.PointwiseConv, layers.PatchConv)
    ):
        return next_fun(*args, **kwargs)
    (x,) = args
    kernel: jax.Array = module.get_variable("params", "kernel")
    if isinstance(module, (layers.DepthwiseConv, layers.PatchConv)):
        strides = module.strides
        groups = x.shape[-1] if isinstance(module, layers.DepthwiseConv) else 1
        pads = layers._resolve_padding(module.padding, x.shape[1:3], module.kernel_size, strides)
    else:
        strides, groups, pads = 1, 1, [(0, 0), (0, 0)]
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (strides, strides),
        pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )
    if module.use_bias:
        y = y + module.get_variable("params", "bias")
    return y


def output_names(kind: str = "heatmap") -> tuple[str, ...]:
    """The exported outputs of a model kind: a regression (KD-Loss) model has no heatmaps."""
    return OUTPUT_NAMES if kind == "heatmap" else ("landmarks",)


def inference_fn(
    model: Any, variables: Mapping[str, Any], native_convs: bool = True, kind: str = "heatmap"
) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """images float32 [B,S,S,3] 0..255 RGB -> (heatmaps [B,S/4,S/4,L], landmarks [B,L,2]),
    or (landmarks,) for a regression model (`output_names(kind)`).

    The variables are closed over, so exporters bake them into the graph as constants.
    native_convs: depthwise and 1x1 convolutions as convolutions (what runtimes have
    kernels for) instead of the training layers' slices and matmuls; same parameters.
    """
    variables = jax.tree.map(jnp.asarray, student_variables(variables))

    def infer(images: jax.Array) -> tuple[jax.Array, ...]:
        x = landmarks.normalize(images)
        if native_convs:
            with nn.intercept_methods(_native_convs):
                raw = landmarks.raw_outputs(kind, model, variables, x)
        else:
            raw = landmarks.raw_outputs(kind, model, variables, x)
        if kind == "regression":
            return (landmarks.from_normalized(raw, images.shape[1]),)
        return raw, decode_landmarks(raw, images.shape[1] / raw.shape[1])

    return infer
