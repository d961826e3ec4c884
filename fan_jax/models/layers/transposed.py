"""Transposed convolutions with PyTorch `ConvTranspose2d` semantics, as a matmul and an
overlap-add of depth-to-space images."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fan_jax.models.layers.forms import Array, Initializer, conv_impl, default_kernel_init, dot


def conv_transpose_torch(
    x: Array,
    kernel: Array,
    strides: int,
    padding: int,
    output_padding: int = 0,
    precision: Any = None,
) -> Array:
    """PyTorch `ConvTranspose2d(k, s, p, output_padding)` for NHWC input.

    `kernel` is (k, k, Cin, Cout) with kernel[a, b, i, o] == torch_weight[i, o, a, b]
    (input pixel (y, x) adds x_i * kernel[a, b, i, :] at output (y*s - p + a, x*s - p + b)).

    When k is a multiple of s this is one matmul to [.., k, k, Cout] followed by an
    overlap-add of k/s x k/s shifted depth-to-space images; for k == s (the student's
    k=2, s=2, p=0) it is exactly a matmul and a reshape. Other shapes fall back to
    `lax.conv_transpose`.
    """
    k, _, cin, cout = kernel.shape
    s = strides
    n, h, w, _ = x.shape
    if k % s != 0:
        return conv_transpose_torch_reference(x, kernel, s, padding, output_padding, precision)
    q = k // s
    y = dot(
        x.reshape(-1, cin),
        kernel.transpose(2, 0, 1, 3).reshape(cin, k * k * cout),
        precision=precision,
    )
    # kernel row a = qa * s + ra lands on output row (y + qa) * s + ra.
    y = y.reshape(n, h, w, q, s, q, s, cout)
    if q == 1:
        full = y.reshape(n, h, w, s, s, cout)
    else:
        full = None
        for qa in range(q):
            for qb in range(q):
                part = jnp.pad(
                    y[:, :, :, qa, :, qb, :, :],
                    ((0, 0), (qa, q - 1 - qa), (qb, q - 1 - qb), (0, 0), (0, 0), (0, 0)),
                )
                full = part if full is None else full + part
    assert full is not None  # q >= 1: the loops above ran
    hf, wf = full.shape[1], full.shape[2]
    full = full.transpose(0, 1, 3, 2, 4, 5).reshape(n, hf * s, wf * s, cout)
    # Full (uncropped) output is (h-1)*s + k; crop p before and p - output_padding after.
    hout = (h - 1) * s - 2 * padding + k + output_padding
    wout = (w - 1) * s - 2 * padding + k + output_padding
    if padding - output_padding < 0:
        extra = output_padding - padding
        full = jnp.pad(full, ((0, 0), (0, extra), (0, extra), (0, 0)))
    return full[:, padding : padding + hout, padding : padding + wout, :]


def conv_transpose_torch_reference(
    x: Array,
    kernel: Array,
    strides: int,
    padding: int,
    output_padding: int = 0,
    precision: Any = None,
) -> Array:
    """The same PyTorch semantics through `lax.conv_transpose` (the obvious, slow form)."""
    k = kernel.shape[0]
    pad = (k - 1 - padding, k - 1 - padding + output_padding)
    return jax.lax.conv_transpose(
        x,
        jnp.flip(kernel, (0, 1)),
        (strides, strides),
        (pad, pad),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )


class ConvTranspose(nn.Module):
    """Transposed convolution with PyTorch `ConvTranspose2d` semantics.

    Parameters: 'kernel' (k, k, Cin, Cout) (as `nn.ConvTranspose`, no spatial flip relative
    to PyTorch's weight.permute(2, 3, 0, 1)), optional 'bias' (Cout,).
    """

    features: int
    kernel_size: int = 2
    strides: int = 2
    torch_padding: int = 0
    output_padding: int = 0
    use_bias: bool = False
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32
        )
        form = conv_transpose_torch_reference if conv_impl() == "lax" else conv_transpose_torch
        y = form(x, kernel, self.strides, self.torch_padding, self.output_padding, self.precision)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return y
