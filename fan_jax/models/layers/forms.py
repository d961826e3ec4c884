"""What the layers share: the form they trace to (`conv_impl`: 'matmul' or 'lax'), chosen per
backend and overridable, the types, and TF/Keras 'SAME' padding."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from flax import linen as nn

Array = jax.Array
Initializer = Callable[..., Array]
Padding = str | Sequence[tuple[int, int]]

default_kernel_init = nn.initializers.lecun_normal()

# The form each backend lowers these layers to. CPU: 'matmul', measured (benchmarks/run.py:
# the train step is several times faster than with lax's 1x1, grouped and transposed convs).
# GPU and TPU: 'lax', XLA's native convolutions, which map to cuDNN and the MXU (the matmul
# and shifted-slice forms exist to work around XLA:CPU). Not yet measured against 'matmul'
# on either: the accelerator section times both forms on the device it runs on.
# Another backend gets 'matmul' (conv_impl's fallback).
CONV_IMPL_DEFAULTS = {"cpu": "matmul", "gpu": "lax", "tpu": "lax"}
CONV_IMPLS = ("matmul", "lax")
_override: list[str] = []


def conv_impl() -> str:
    """The form layers trace to now: a `use_conv_impl` override, $FAN_JAX_CONV_IMPL, or the
    backend's default (`CONV_IMPL_DEFAULTS`)."""
    name = (
        _override[-1]
        if _override
        else os.environ.get("FAN_JAX_CONV_IMPL")
        or CONV_IMPL_DEFAULTS.get(jax.default_backend(), "matmul")
    )
    if name not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS} (FAN_JAX_CONV_IMPL), got {name!r}")
    return name


@contextlib.contextmanager
def use_conv_impl(name: str) -> Iterator[None]:
    """`with use_conv_impl('lax'): ...`: functions traced inside use that form."""
    if name not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {name!r}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


_dot_dtypes: list[str] = []


def dot_dtype() -> str:
    """The dtype the layers' matmuls run in now: 'float32', or 'bfloat16' inside
    `use_dot_dtype('bfloat16')` (inputs rounded to bf16, products summed in float32)."""
    return _dot_dtypes[-1] if _dot_dtypes else "float32"


@contextlib.contextmanager
def use_dot_dtype(name: str) -> Iterator[None]:
    """`with use_dot_dtype('bfloat16'): ...`: the 1x1 and transposed convs traced inside
    multiply in bf16 (AMX / AVX512-BF16 units) and everything else, the patch stem included
    (`patch_conv`), stays float32."""
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dot dtype must be 'float32' or 'bfloat16', got {name!r}")
    _dot_dtypes.append(name)
    try:
        yield
    finally:
        _dot_dtypes.pop()


_unroll_max_k: list[int] = []


def unrolled_max_k() -> int:
    """Matmuls with at most this many input channels trace to multiply-adds (0: none);
    set by `use_unrolled_dots`."""
    return _unroll_max_k[-1] if _unroll_max_k else 0


@contextlib.contextmanager
def use_unrolled_dots(max_k: int) -> Iterator[None]:
    """`with use_unrolled_dots(16): ...`, for inference: a matmul traced inside with at most
    `max_k` input channels becomes `max_k` float32 broadcast multiply-adds, and the patch stem
    (`patch_conv`) its 27 taps, which XLA:CPU fuses with the BatchNorm, ReLU6 and padding
    around them. A matmul library call cannot fuse, and with so few input channels it is
    bound by writing its output: block_1's expand (16 -> 96 channels at 128x128) wrote 6 MB
    that the next pass read back. Their gradients are slow: training does not use them."""
    _unroll_max_k.append(int(max_k))
    try:
        yield
    finally:
        _unroll_max_k.pop()


# The inference programs unroll matmuls of up to 16 input channels (the stem and block_1's
# expand): 1.10x (bf16 matmuls) and 1.07x (float32) faster at batch 1 than unrolling none;
# 24 (block_2's and block_3's expands too) 1.09x / 1.05x, 32 1.05x bf16 (2-core AMX Xeon,
# 2026-12-07, both programs in one process, timed in turns).
INFERENCE_UNROLL_MAX_K = 16


@contextlib.contextmanager
def inference_forms(precision: str = "float32") -> Iterator[None]:
    """The forms `fan_jax.predict` traces the network in: `use_dot_dtype(precision)` and
    `use_unrolled_dots(INFERENCE_UNROLL_MAX_K)`."""
    with use_dot_dtype(precision), use_unrolled_dots(INFERENCE_UNROLL_MAX_K):
        yield


def unrolled_dot(a: Array, b: Array) -> Array:
    """a [M, K] @ b [K, N] as K float32 broadcast multiply-adds (see `use_unrolled_dots`)."""
    import jax.numpy as jnp

    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    out = a[:, 0:1] * b[0]
    for i in range(1, a.shape[-1]):
        out = out + a[:, i : i + 1] * b[i]
    return out


def dot(a: Array, b: Array, precision: Any = None) -> Array:
    """`jnp.dot` in the `dot_dtype` of the moment, with a float32 result either way (or
    `unrolled_dot` inside `use_unrolled_dots`, for few input channels)."""
    import jax.numpy as jnp

    if a.ndim == 2 and a.shape[-1] <= unrolled_max_k():
        return unrolled_dot(a, b)
    floats = (jnp.float32, jnp.bfloat16)
    if dot_dtype() == "bfloat16" and a.dtype in floats and b.dtype in floats:
        return jnp.dot(
            a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32
        )
    return jnp.dot(a, b, precision=precision)


_NHWC = ("NHWC", "HWIO", "NHWC")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/Keras 'SAME' padding for one spatial dim: the extra pixel goes on the high side."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _resolve_padding(
    padding: Padding, spatial: Sequence[int], kernel: int, stride: int
) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        if padding.upper() == "SAME":
            return [same_padding(s, kernel, stride) for s in spatial]
        if padding.upper() == "VALID":
            return [(0, 0)] * len(spatial)
        raise ValueError(f"unknown padding {padding!r}")
    return [(int(p[0]), int(p[1])) for p in padding]
