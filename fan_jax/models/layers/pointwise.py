"""1x1 convolutions as one matmul, and few-input-channel k x k convolutions (the stem) as one
matmul over space-to-depth patches."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fan_jax.models.layers.depthwise import _depthwise_geometry, _depthwise_pad
from fan_jax.models.layers.forms import (
    _NHWC,
    Array,
    Initializer,
    Padding,
    _resolve_padding,
    conv_impl,
    default_kernel_init,
    dot,
    unrolled_max_k,
)


class PointwiseConv(nn.Module):
    """1x1 convolution as a `[N*H*W, Cin] @ [Cin, Cout]` matmul.

    Parameters match `nn.Conv(features, (1, 1))`: 'kernel' (1, 1, Cin, Cout) and 'bias'.
    """

    features: int
    use_bias: bool = False
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (1, 1, cin, self.features), jnp.float32)
        if conv_impl() == "lax":
            y = jax.lax.conv_general_dilated(
                x, kernel, (1, 1), "VALID", dimension_numbers=_NHWC, precision=self.precision
            )
        else:
            y = dot(
                x.reshape(-1, cin), kernel.reshape(cin, self.features), precision=self.precision
            )
            y = y.reshape(*x.shape[:-1], self.features)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return y


class PatchConv(nn.Module):
    """k x k convolution as one matmul over patches, for layers with few input channels.

    XLA:CPU's native convolution runs MobileNetV2's 3-channel stem ~8x below the matmul
    rate. Here a stride-s input is first rearranged space-to-depth (s x s pixels -> one
    pixel of s*s*Cin channels), which turns the conv into a stride-1 ceil(k/s)-tap one on
    the rearranged input; its taps are concatenated into `[N*Ho*Wo, taps*s*s*Cin]` and
    multiplied by the zero-padded, rearranged kernel. Fewer, wider slices than plain
    im2col (4 of 12 channels rather than 9 of 3 for the stem), which XLA:CPU copies much
    faster. Parameters match `nn.Conv(features, (k, k))`: 'kernel' (k, k, Cin, Cout) and
    'bias'; padding as `DepthwiseConv`'s.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: Padding = "SAME"
    use_bias: bool = False
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, s, cin = self.kernel_size, self.strides, x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, cin, self.features), jnp.float32)
        if conv_impl() == "lax":
            pads = _resolve_padding(self.padding, x.shape[1:3], k, s)
            y = jax.lax.conv_general_dilated(
                x, kernel, (s, s), pads, dimension_numbers=_NHWC, precision=self.precision
            )
        else:
            y = patch_conv(x, kernel, s, self.padding, self.precision)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return y


def patch_conv(
    x: Array, kernel: Array, strides: int, padding: Padding, precision: Any = None
) -> Array:
    """`PatchConv`'s matmul form: x [N, H, W, Cin], kernel [k, k, Cin, Cout]."""
    k, _, cin, cout = kernel.shape
    s = strides
    taps = (k - 1) // s + 1
    _, (hp, wp), (ho, wo) = _depthwise_geometry(x.shape, k, s, padding)
    xp = _depthwise_pad(x, k, s, padding)
    n = xp.shape[0]
    if unrolled_max_k():
        return _patch_conv_unrolled(xp, kernel, s, (ho, wo))
    z = xp.reshape(n, hp // s, s, wp // s, s, cin).transpose(0, 1, 3, 2, 4, 5)
    z = z.reshape(n, hp // s, wp // s, s * s * cin)
    patches = jnp.concatenate(
        [z[:, a : a + ho, b : b + wo] for a in range(taps) for b in range(taps)], axis=-1
    )
    # Kernel tap (a*s + p, b*s + q) multiplies channel block (p, q) of rearranged tap (a, b);
    # taps past k are zero.
    kz = jnp.pad(kernel, ((0, taps * s - k), (0, taps * s - k), (0, 0), (0, 0)))
    kz = kz.reshape(taps, s, taps, s, cin, cout).transpose(0, 2, 1, 3, 4, 5)
    # Float32 even under `use_dot_dtype('bfloat16')`: XLA:CPU gathers bf16 patches ~3x
    # slower than float32 ones, which cost more than the bf16 matmul saves (the whole bf16
    # stem 1.37 ms, float32 0.89 ms; 2-core AMX Xeon, 2026-12-07).
    y = jnp.dot(
        patches.reshape(-1, taps * taps * s * s * cin), kz.reshape(-1, cout), precision=precision
    )
    return y.reshape(n, ho, wo, cout)


def _patch_conv_unrolled(xp: Array, kernel: Array, s: int, out_hw: tuple[int, int]) -> Array:
    """`patch_conv` as k*k*Cin broadcast multiply-adds on the padded input's polyphase
    components (`use_unrolled_dots`): one loop that XLA:CPU fuses with the BatchNorm and
    ReLU6 after it, with no patch matrix written in between (0.79 against 1.0 ms for the
    stem with its BatchNorm, ReLU6 and the next layer's padding; 2-core AMX Xeon)."""
    k, _, cin, _ = kernel.shape
    n, hp, wp, _ = xp.shape
    ho, wo = out_hw
    z = xp.reshape(n, hp // s, s, wp // s, s, cin).astype(jnp.float32)
    kernel = kernel.astype(jnp.float32)
    out = None
    for i in range(k):
        for j in range(k):
            a, p, b, q = i // s, i % s, j // s, j % s
            for c in range(cin):
                term = z[:, a : a + ho, p, b : b + wo, q, c : c + 1] * kernel[i, j, c]
                out = term if out is None else out + term
    assert out is not None  # k >= 1, cin >= 1
    return out
