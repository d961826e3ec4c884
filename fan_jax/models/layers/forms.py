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


def dot(a: Array, b: Array, precision: Any = None) -> Array:
    """`jnp.dot` in the `dot_dtype` of the moment, with a float32 result either way."""
    import jax.numpy as jnp

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
