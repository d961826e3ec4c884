"""Depthwise convolutions as k*k shifted slices of the padded input, with a custom VJP."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn

from fan_jax.models.layers.forms import (
    _NHWC,
    Array,
    Initializer,
    Padding,
    _resolve_padding,
    conv_impl,
    default_kernel_init,
)


def _depthwise_geometry(
    shape: tuple[int, ...], k: int, strides: int, padding: Padding
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """((top, left) padding, padded (h, w), output (h, w))."""
    _, h, w, _ = shape
    s = strides
    (pt, pb), (pl, pr) = _resolve_padding(padding, (h, w), k, s)
    ho = (h + pt + pb - k) // s + 1
    wo = (w + pl + pr - k) // s + 1
    # Padded extent: s * (out + (k-1)//s) per dim, so the input splits into s x s equal
    # polyphase components and every tap is a contiguous slice of one of them.
    hp = s * (ho + (k - 1) // s)
    wp = s * (wo + (k - 1) // s)
    return (pt, pl), (hp, wp), (ho, wo)


def _depthwise_pad(x: Array, k: int, strides: int, padding: Padding) -> Array:
    (pt, pl), (hp, wp), _ = _depthwise_geometry(x.shape, k, strides, padding)
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (pt, max(hp - h - pt, 0)), (pl, max(wp - w - pl, 0)), (0, 0)))
    return xp[:, :hp, :wp]


def _depthwise_taps(
    xp: Array, k: int, strides: int, out_hw: tuple[int, int]
) -> Iterator[tuple[tuple[int, int], Array]]:
    """Yields ((i, j), tap) with tap [N, Ho, Wo, C] the input pixels kernel tap (i, j) reads."""
    n, hp, wp, c = xp.shape
    s = strides
    ho, wo = out_hw
    phases = xp.reshape(n, hp // s, s, wp // s, s, c)
    for i in range(k):
        for j in range(k):
            yield (i, j), phases[:, i // s : i // s + ho, i % s, j // s : j // s + wo, j % s, :]


def _depthwise_padded(xp: Array, kernel: Array, strides: int, out_hw: tuple[int, int]) -> Array:
    k, c = kernel.shape[0], kernel.shape[-1]
    kernel = kernel.reshape(k, k, c)
    out = None
    for (i, j), tap in _depthwise_taps(xp, k, strides, out_hw):
        term = tap * kernel[i, j]
        out = term if out is None else out + term
    assert out is not None  # k >= 1 taps
    return out


def _batch_sum(a: Array, max_terms: int = 8) -> Array:
    """Sums [N, ...] over N as an unrolled add of slices (<= max_terms) -> [G, ...].

    XLA:CPU emits a reduction over the major axis of a sliced, fused product as a slow
    scalar loop; an unrolled add stays a vectorised elementwise loop.
    """
    n = a.shape[0]
    terms = max(d for d in range(1, min(n, max_terms) + 1) if n % d == 0)
    a = a.reshape(n // terms, terms, *a.shape[1:])
    out = a[:, 0]
    for t in range(1, terms):
        out = out + a[:, t]
    return out


def _depthwise_input_grad(
    gp: Array, kernel: Array, strides: int, padding: Padding, x_shape: tuple[int, int, int, int]
) -> Array:
    """Transpose of the depthwise conv in x, written like the forward: from g padded by
    (k-1)//s on each side (`gp`), sum shifted slices per polyphase component of the padded
    input, then interleave and crop.

    (The autodiff transpose is a sum of k*k pads of g*w inside one fusion, into which XLA
    duplicates g's producer, typically a BatchNorm backward, k*k times.)
    """
    k, c = kernel.shape[0], kernel.shape[-1]
    s = strides
    n = gp.shape[0]
    (pt, pl), (hp, wp), _ = _depthwise_geometry(x_shape, k, s, padding)
    q = (k - 1) // s
    kernel = kernel.reshape(k, k, c)
    rows, cols = hp // s, wp // s
    phases = []
    for a in range(s):
        row = []
        for b in range(s):
            acc = None
            for i in range(a, k, s):
                for j in range(b, k, s):
                    di, dj = q - i // s, q - j // s
                    term = gp[:, di : di + rows, dj : dj + cols] * kernel[i, j]
                    acc = term if acc is None else acc + term
            row.append(jnp.zeros((n, rows, cols, c), gp.dtype) if acc is None else acc)
        phases.append(row)
    if s == 1:
        dxp = phases[0][0]
    else:
        dxp = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2).reshape(n, hp, wp, c)
    h, w = x_shape[1:3]
    dxp = jnp.pad(dxp, ((0, 0), (0, max(pt + h - hp, 0)), (0, max(pl + w - wp, 0)), (0, 0)))
    return dxp[:, pt : pt + h, pl : pl + w]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_conv(x: Array, kernel: Array, strides: int, padding: Padding) -> Array:
    k = kernel.shape[0]
    _, _, out_hw = _depthwise_geometry(x.shape, k, strides, padding)
    return _depthwise_padded(_depthwise_pad(x, k, strides, padding), kernel, strides, out_hw)


def _depthwise_conv_fwd(
    x: Array, kernel: Array, strides: int, padding: Padding
) -> tuple[Array, tuple[Array, Array, tuple[int, ...]]]:
    k = kernel.shape[0]
    _, _, out_hw = _depthwise_geometry(x.shape, k, strides, padding)
    xp = _depthwise_pad(x, k, strides, padding)
    # The padded input is the only residual: autodiff of the slice form would keep k*k
    # shifted copies of it alive for the kernel gradient.
    return _depthwise_padded(xp, kernel, strides, out_hw), (xp, kernel, x.shape)


def _depthwise_conv_bwd(
    strides: int, padding: Padding, res: tuple[Array, Array, tuple[int, ...]], g: Array
) -> tuple[Array, Array]:
    xp, kernel, shape = res
    x_shape = (shape[0], shape[1], shape[2], shape[3])
    k, c = kernel.shape[0], kernel.shape[-1]
    ho, wo = g.shape[1], g.shape[2]
    out_hw = (ho, wo)
    # XLA fuses g's producer (a BatchNorm backward) into the pad and materialises it once;
    # every tap below then reads the padded copy instead of recomputing it.
    q = (k - 1) // strides
    gp = jnp.pad(g, ((0, 0), (q, q), (q, q), (0, 0)))
    # Materialised once: without the barrier XLA sees through slice(pad(g)) and fuses g's
    # producer (the BatchNorm backward, three full reads) into every tap's fusion below.
    gp = jax.lax.optimization_barrier(gp)
    dx = _depthwise_input_grad(gp, kernel, strides, padding, x_shape)
    g = gp[:, q : q + ho, q : q + wo]
    # d/dkernel[i, j, c] = sum over n, y, x of tap_ij * g: first an unrolled sum over the
    # batch (elementwise), then a ones-vector matmul over positions (a reduction over a
    # non-minor axis of a fused product is slow on XLA:CPU; a GEMV is not). One GEMV per
    # tap: stacking the k*k products first costs XLA:CPU an extra concatenate (~25% slower).
    dk = []
    for _, tap in _depthwise_taps(xp, k, strides, out_hw):
        partial_sum = _batch_sum(tap * g).reshape(-1, c)
        ones = jnp.ones((partial_sum.shape[0],), partial_sum.dtype)
        dk.append(
            jnp.dot(
                ones,
                partial_sum,
                precision=jax.lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32,
            )
        )
    return dx, jnp.stack(dk).reshape(k, k, 1, c).astype(kernel.dtype)


_depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


def depthwise_conv(x: Array, kernel: Array, strides: int = 1, padding: Padding = "SAME") -> Array:
    """Depthwise conv as a sum of k*k shifted slices times per-channel weights.

    `kernel` is (k, k, 1, C) (the `nn.Conv(feature_group_count=C)` layout). For stride s
    the padded input is split into its s x s polyphase components first so every tap is
    a contiguous slice. A custom VJP keeps only the padded input for the backward pass.
    """
    if not isinstance(padding, str):
        padding = tuple((int(p[0]), int(p[1])) for p in padding)
    return _depthwise_conv(x, kernel, int(strides), padding)


class DepthwiseConv(nn.Module):
    """Depthwise k x k convolution (no channel multiplier), written with shifted slices.

    Parameters match `nn.Conv(C, (k, k), feature_group_count=C)`: 'kernel' (k, k, 1, C).
    Padding 'SAME' equals Keras's MobileNetV2 (pads (0, 1) for stride 2 on even inputs).
    """

    kernel_size: int = 3
    strides: int = 1
    padding: Padding = "SAME"
    use_bias: bool = False
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        kernel = self.param(
            "kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1, c), jnp.float32
        )
        if conv_impl() == "lax":
            pads = _resolve_padding(self.padding, x.shape[1:3], self.kernel_size, self.strides)
            y = jax.lax.conv_general_dilated(
                x, kernel, (self.strides,) * 2, pads, dimension_numbers=_NHWC, feature_group_count=c
            )
        else:
            y = depthwise_conv(x, kernel, self.strides, self.padding)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (c,), jnp.float32)
        return y
