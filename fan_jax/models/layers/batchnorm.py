"""BatchNorm with a fused activation and a custom VJP that never materialises x - mean."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn

from fan_jax.models.layers.forms import Array, Initializer

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
def batch_norm_act_train(
    x: Array, scale: Array, bias: Array, epsilon: float, activation: str | None
) -> Array:
    """act(BatchNorm(x)) with batch statistics over all but the last axis (training mode).

    The custom VJP recomputes the normalised input from x in the backward pass and uses
    sum(g*x) - mean*sum(g) for the scale gradient, so neither pass materialises x - mean
    (autodiff of the textbook formula stores it, a full extra write and read per layer).
    """
    return _bn_act_fwd(x, scale, bias, epsilon, activation)[0]


def _normalise(x: Array, mean: Array, a: Array, bias: Array) -> Array:
    # Statistics are float32; the output keeps the input's dtype (bfloat16 stays bfloat16).
    a = a.astype(x.dtype)
    return x * a + (bias.astype(jnp.float32) - mean * a.astype(jnp.float32)).astype(x.dtype)


def _bn_act_fwd(
    x: Array, scale: Array, bias: Array, epsilon: float, activation: str | None
) -> tuple[Array, tuple[Array, ...]]:
    mean, var = _batch_moments(x)
    rstd = jax.lax.rsqrt(var + epsilon)
    act = _ACTIVATIONS[activation][0]
    a = scale.astype(jnp.float32) * rstd
    return act(_normalise(x, mean, a, bias)), (x, scale, bias, mean, rstd)


def _bn_act_bwd(
    epsilon: float, activation: str | None, res: tuple[Array, ...], g: Array
) -> tuple[Array, Array, Array]:
    x, scale, bias, mean, rstd = res
    m = x.size // x.shape[-1]
    mask_fn = _ACTIVATIONS[activation][1]
    a = scale.astype(jnp.float32) * rstd
    if mask_fn is not None:
        g = jnp.where(mask_fn(_normalise(x, mean, a, bias)), g, jnp.zeros_like(g))
    sum_g = _channel_sum(g)
    sum_gx = _channel_sum(g * x)
    dbias = sum_g
    dscale = (sum_gx - mean * sum_g) * rstd  # sum(g * xhat)
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
            "use_running_average", self.use_running_average, use_running_average
        )
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
