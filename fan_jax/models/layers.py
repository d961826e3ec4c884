"""Convolution layers written as matmuls and shifted slices.

XLA:CPU lowers 1x1 convolutions, grouped (depthwise) convolutions and transposed
convolutions poorly, especially their gradients (a 1x1 conv's backward pass is ~20x
slower than the same matmul's). Each layer here keeps the parameter names and shapes
of the flax layer it replaces, so checkpoints and weight converters see `nn.Conv` /
`nn.ConvTranspose` layouts, and is tested against the plain `lax` convolution. Matmuls
and slices are also the natural formulation on GPU/TPU, so nothing here is CPU-only.

Each layer also has its native `lax` form (`conv_impl`): 'matmul' (the forms here) or 'lax'
(`lax.conv_general_dilated` / `lax.conv_transpose`), chosen per backend at trace time.
`benchmarks/run.py --sections accelerator` times both on the device it runs on.
"""

from __future__ import annotations

import contextlib
import os
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
Initializer = Callable[..., Array]
Padding = str | Sequence[tuple[int, int]]

default_kernel_init = nn.initializers.lecun_normal()

# The form each backend lowers these layers to. CPU: 'matmul', measured (benchmarks/run.py:
# the train step is several times faster than with lax's 1x1, grouped and transposed convs).
# GPU and TPU: 'matmul' too, for now: the same tested code everywhere; not yet measured on
# either, so the accelerator section reports both forms for a device run to settle it.
CONV_IMPL_DEFAULTS = {"cpu": "matmul", "gpu": "matmul", "tpu": "matmul"}
CONV_IMPLS = ("matmul", "lax")
_override: list[str] = []


def conv_impl() -> str:
    """The form layers trace to now: a `use_conv_impl` override, $FAN_JAX_CONV_IMPL, or the
    backend's default (`CONV_IMPL_DEFAULTS`)."""
    name = (_override[-1] if _override else os.environ.get("FAN_JAX_CONV_IMPL")
            or CONV_IMPL_DEFAULTS.get(jax.default_backend(), "matmul"))
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


_NHWC = ("NHWC", "HWIO", "NHWC")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/Keras 'SAME' padding for one spatial dim: the extra pixel goes on the high side."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _resolve_padding(padding: Padding, spatial: Sequence[int], kernel: int,
                     stride: int) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        if padding.upper() == "SAME":
            return [same_padding(s, kernel, stride) for s in spatial]
        if padding.upper() == "VALID":
            return [(0, 0)] * len(spatial)
        raise ValueError(f"unknown padding {padding!r}")
    return [tuple(p) for p in padding]


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
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_NHWC,
                                             precision=self.precision)
        else:
            y = jnp.dot(x.reshape(-1, cin), kernel.reshape(cin, self.features),
                        precision=self.precision)
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
            y = jax.lax.conv_general_dilated(x, kernel, (s, s), pads, dimension_numbers=_NHWC,
                                             precision=self.precision)
        else:
            y = patch_conv(x, kernel, s, self.padding, self.precision)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return y


def patch_conv(x: Array, kernel: Array, strides: int, padding: Padding,
               precision: Any = None) -> Array:
    """`PatchConv`'s matmul form: x [N, H, W, Cin], kernel [k, k, Cin, Cout]."""
    k, _, cin, cout = kernel.shape
    s = strides
    taps = (k - 1) // s + 1
    _, (hp, wp), (ho, wo) = _depthwise_geometry(x.shape, k, s, padding)
    xp = _depthwise_pad(x, k, s, padding)
    n = xp.shape[0]
    z = xp.reshape(n, hp // s, s, wp // s, s, cin).transpose(0, 1, 3, 2, 4, 5)
    z = z.reshape(n, hp // s, wp // s, s * s * cin)
    patches = jnp.concatenate([z[:, a:a + ho, b:b + wo] for a in range(taps) for b in range(taps)],
                              axis=-1)
    # Kernel tap (a*s + p, b*s + q) multiplies channel block (p, q) of rearranged tap (a, b);
    # taps past k are zero.
    kz = jnp.pad(kernel, ((0, taps * s - k), (0, taps * s - k), (0, 0), (0, 0)))
    kz = kz.reshape(taps, s, taps, s, cin, cout).transpose(0, 2, 1, 3, 4, 5)
    y = jnp.dot(patches.reshape(-1, taps * taps * s * s * cin), kz.reshape(-1, cout),
                precision=precision)
    return y.reshape(n, ho, wo, cout)


def _depthwise_geometry(shape, k: int, strides: int, padding: Padding):
    n, h, w, c = shape
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


def _depthwise_taps(xp: Array, k: int, strides: int, out_hw: tuple[int, int]):
    """Yields ((i, j), tap) with tap [N, Ho, Wo, C] the input pixels kernel tap (i, j) reads."""
    n, hp, wp, c = xp.shape
    s = strides
    ho, wo = out_hw
    phases = xp.reshape(n, hp // s, s, wp // s, s, c)
    for i in range(k):
        for j in range(k):
            yield (i, j), phases[:, i // s:i // s + ho, i % s, j // s:j // s + wo, j % s, :]


def _depthwise_padded(xp: Array, kernel: Array, strides: int, out_hw: tuple[int, int]) -> Array:
    k, c = kernel.shape[0], kernel.shape[-1]
    kernel = kernel.reshape(k, k, c)
    out = None
    for (i, j), tap in _depthwise_taps(xp, k, strides, out_hw):
        term = tap * kernel[i, j]
        out = term if out is None else out + term
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


def _depthwise_input_grad(gp: Array, kernel: Array, strides: int, padding: Padding,
                          x_shape) -> Array:
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
                    term = gp[:, di:di + rows, dj:dj + cols] * kernel[i, j]
                    acc = term if acc is None else acc + term
            row.append(jnp.zeros((n, rows, cols, c), gp.dtype) if acc is None else acc)
        phases.append(row)
    if s == 1:
        dxp = phases[0][0]
    else:
        dxp = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2).reshape(n, hp, wp, c)
    h, w = x_shape[1:3]
    dxp = jnp.pad(dxp, ((0, 0), (0, max(pt + h - hp, 0)), (0, max(pl + w - wp, 0)), (0, 0)))
    return dxp[:, pt:pt + h, pl:pl + w]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_conv(x: Array, kernel: Array, strides: int, padding: Padding) -> Array:
    k = kernel.shape[0]
    _, _, out_hw = _depthwise_geometry(x.shape, k, strides, padding)
    return _depthwise_padded(_depthwise_pad(x, k, strides, padding), kernel, strides, out_hw)


def _depthwise_conv_fwd(x, kernel, strides, padding):
    k = kernel.shape[0]
    _, _, out_hw = _depthwise_geometry(x.shape, k, strides, padding)
    xp = _depthwise_pad(x, k, strides, padding)
    # The padded input is the only residual: autodiff of the slice form would keep k*k
    # shifted copies of it alive for the kernel gradient.
    return _depthwise_padded(xp, kernel, strides, out_hw), (xp, kernel, x.shape)


def _depthwise_conv_bwd(strides, padding, res, g):
    xp, kernel, x_shape = res
    k, c = kernel.shape[0], kernel.shape[-1]
    out_hw = ho, wo = g.shape[1:3]
    # XLA fuses g's producer (a BatchNorm backward) into the pad and materialises it once;
    # every tap below then reads the padded copy instead of recomputing it.
    q = (k - 1) // strides
    gp = jnp.pad(g, ((0, 0), (q, q), (q, q), (0, 0)))
    # Materialised once: without the barrier XLA sees through slice(pad(g)) and fuses g's
    # producer (the BatchNorm backward, three full reads) into every tap's fusion below.
    gp = jax.lax.optimization_barrier(gp)
    dx = _depthwise_input_grad(gp, kernel, strides, padding, x_shape)
    g = gp[:, q:q + ho, q:q + wo]
    # d/dkernel[i, j, c] = sum over n, y, x of tap_ij * g: first an unrolled sum over the
    # batch (elementwise), then a ones-vector matmul over positions (a reduction over a
    # non-minor axis of a fused product is slow on XLA:CPU; a GEMV is not). One GEMV per
    # tap: stacking the k*k products first costs XLA:CPU an extra concatenate (~25% slower).
    dk = []
    for _, tap in _depthwise_taps(xp, k, strides, out_hw):
        partial_sum = _batch_sum(tap * g).reshape(-1, c)
        ones = jnp.ones((partial_sum.shape[0],), partial_sum.dtype)
        dk.append(jnp.dot(ones, partial_sum, precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32))
    return dx, jnp.stack(dk).reshape(k, k, 1, c).astype(kernel.dtype)


_depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


def depthwise_conv(x: Array, kernel: Array, strides: int = 1,
                   padding: Padding = "SAME") -> Array:
    """Depthwise conv as a sum of k*k shifted slices times per-channel weights.

    `kernel` is (k, k, 1, C) (the `nn.Conv(feature_group_count=C)` layout). For stride s
    the padded input is split into its s x s polyphase components first so every tap is
    a contiguous slice. A custom VJP keeps only the padded input for the backward pass.
    """
    if not isinstance(padding, str):
        padding = tuple(tuple(int(v) for v in p) for p in padding)
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
        kernel = self.param("kernel", self.kernel_init,
                            (self.kernel_size, self.kernel_size, 1, c), jnp.float32)
        if conv_impl() == "lax":
            pads = _resolve_padding(self.padding, x.shape[1:3], self.kernel_size, self.strides)
            y = jax.lax.conv_general_dilated(x, kernel, (self.strides,) * 2, pads,
                                             dimension_numbers=_NHWC, feature_group_count=c)
        else:
            y = depthwise_conv(x, kernel, self.strides, self.padding)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (c,), jnp.float32)
        return y


def conv_transpose_torch(x: Array, kernel: Array, strides: int, padding: int,
                         output_padding: int = 0, precision: Any = None) -> Array:
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
    y = jnp.dot(x.reshape(-1, cin), kernel.transpose(2, 0, 1, 3).reshape(cin, k * k * cout),
                precision=precision)
    # kernel row a = qa * s + ra lands on output row (y + qa) * s + ra.
    y = y.reshape(n, h, w, q, s, q, s, cout)
    if q == 1:
        full = y.reshape(n, h, w, s, s, cout)
    else:
        full = None
        for qa in range(q):
            for qb in range(q):
                part = jnp.pad(y[:, :, :, qa, :, qb, :, :],
                               ((0, 0), (qa, q - 1 - qa), (qb, q - 1 - qb), (0, 0), (0, 0), (0, 0)))
                full = part if full is None else full + part
    hf, wf = full.shape[1], full.shape[2]
    full = full.transpose(0, 1, 3, 2, 4, 5).reshape(n, hf * s, wf * s, cout)
    # Full (uncropped) output is (h-1)*s + k; crop p before and p - output_padding after.
    hout = (h - 1) * s - 2 * padding + k + output_padding
    wout = (w - 1) * s - 2 * padding + k + output_padding
    if padding - output_padding < 0:
        extra = output_padding - padding
        full = jnp.pad(full, ((0, 0), (0, extra), (0, extra), (0, 0)))
    return full[:, padding:padding + hout, padding:padding + wout, :]


def conv_transpose_torch_reference(x: Array, kernel: Array, strides: int, padding: int,
                                   output_padding: int = 0, precision: Any = None) -> Array:
    """The same PyTorch semantics through `lax.conv_transpose` (the obvious, slow form)."""
    k = kernel.shape[0]
    pad = (k - 1 - padding, k - 1 - padding + output_padding)
    return jax.lax.conv_transpose(
        x, jnp.flip(kernel, (0, 1)), (strides, strides), (pad, pad),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


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
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                            jnp.float32)
        form = (conv_transpose_torch_reference if conv_impl() == "lax"
                else conv_transpose_torch)
        y = form(x, kernel, self.strides, self.torch_padding, self.output_padding, self.precision)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
        return y


# ----------------------------------------------------------------------------- BatchNorm

_ACTIVATIONS = {
    None: (lambda y: y, None),
    "relu": (jax.nn.relu, lambda y: y > 0),
    "relu6": (jax.nn.relu6, lambda y: (y > 0) & (y < 6)),
}


def _channel_sum(a: Array) -> Array:
    # float32 accumulation whatever the input dtype (bfloat16 sums of 10^5 terms drift).
    return jnp.sum(a.reshape(-1, a.shape[-1]), axis=0, dtype=jnp.float32)


def _batch_moments(x: Array) -> tuple[Array, Array]:
    # E[x^2] - E[x]^2 (flax's use_fast_variance): two plain reductions of x, no centred copy.
    m = x.size // x.shape[-1]
    mean = _channel_sum(x) / m
    var = jnp.maximum(_channel_sum(x * x) / m - mean * mean, 0.0)
    return mean, var


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_act_train(x: Array, scale: Array, bias: Array, epsilon: float,
                         activation: str | None) -> Array:
    """act(BatchNorm(x)) with batch statistics over all but the last axis (training mode).

    The custom VJP recomputes the normalised input from x in the backward pass and uses
    sum(g*x) - mean*sum(g) for the scale gradient, so neither pass materialises x - mean
    (autodiff of the textbook formula stores it, a full extra write and read per layer).
    """
    return _bn_act_fwd(x, scale, bias, epsilon, activation)[0]


def _normalise(x, mean, a, bias):
    # Statistics are float32; the output keeps the input's dtype (bfloat16 stays bfloat16).
    a = a.astype(x.dtype)
    return x * a + (bias.astype(jnp.float32) - mean * a.astype(jnp.float32)).astype(x.dtype)


def _bn_act_fwd(x, scale, bias, epsilon, activation):
    mean, var = _batch_moments(x)
    rstd = jax.lax.rsqrt(var + epsilon)
    act = _ACTIVATIONS[activation][0]
    a = scale.astype(jnp.float32) * rstd
    return act(_normalise(x, mean, a, bias)), (x, scale, bias, mean, rstd)


def _bn_act_bwd(epsilon, activation, res, g):
    x, scale, bias, mean, rstd = res
    m = x.size // x.shape[-1]
    mask_fn = _ACTIVATIONS[activation][1]
    a = scale.astype(jnp.float32) * rstd
    if mask_fn is not None:
        g = jnp.where(mask_fn(_normalise(x, mean, a, bias)), g, jnp.zeros_like(g))
    sum_g = _channel_sum(g)
    sum_gx = _channel_sum(g * x)
    dbias = sum_g
    dscale = (sum_gx - mean * sum_g) * rstd          # sum(g * xhat)
    # dx = a * (g - mean(g) - xhat * mean(g * xhat)), with xhat = (x - mean) * rstd; the
    # per-channel factors are float32, the per-pixel products in the input's dtype.
    k = dscale * rstd / m
    dt = x.dtype
    dx = a.astype(dt) * g - (a * k).astype(dt) * x + (a * (k * mean - sum_g / m)).astype(dt)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_act_train.defvjp(_bn_act_fwd, _bn_act_bwd)


class BatchNorm(nn.Module):
    """BatchNorm over the last axis with an optional fused activation ('relu', 'relu6').

    Drop-in for `nn.BatchNorm(use_running_average=..., momentum, epsilon)` followed by the
    activation: same variables ('params': scale, bias; 'batch_stats': mean, var), same
    statistics (biased batch variance, E[x^2] - E[x]^2), same running-average update
    (skipped while initialising). Training mode uses `batch_norm_act_train`.
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    activation: str | None = None
    scale_init: Initializer = nn.initializers.ones_init()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", self.bias_init, (c,), jnp.float32)
        if use_running_average:
            a = scale.astype(jnp.float32) * jax.lax.rsqrt(ra_var.value + self.epsilon)
            return _ACTIVATIONS[self.activation][0](_normalise(x, ra_mean.value, a, bias))
        if not self.is_initializing():
            # Identical reductions inside batch_norm_act_train are CSE'd with these.
            mean, var = _batch_moments(jax.lax.stop_gradient(x))
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return batch_norm_act_train(x, scale, bias, self.epsilon, self.activation)
