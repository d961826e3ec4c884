"""MobileNetV2 encoder truncated after the last 320-channel bottleneck (output stride 32).

Submodule names are Keras's `keras.applications.MobileNetV2` layer names ('Conv1',
'bn_Conv1', 'expanded_conv_depthwise', 'block_1_expand', 'block_1_expand_BN', ...,
'block_16_project_BN'), all at the top level of this module's parameter tree, so the
Keras weight import is a name mapping. Layout differences from Keras: depthwise kernels
are (3, 3, 1, C) (Keras: (3, 3, C, 1)); BatchNorm 'scale'/'bias'/'mean'/'var' for Keras's
gamma/beta/moving_mean/moving_variance.

Padding follows Keras ('SAME': stride-2 convs pad (0, 1) on even inputs), BN epsilon is
Keras's 1e-3. BN momentum defaults to 0.9 (PyTorch's 0.1, the recipe the paper trains
with); Keras uses 0.999.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from fan_jax.models.layers import BatchNorm, DepthwiseConv, PatchConv, PointwiseConv

Array = jax.Array

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Keras/TF-slim channel rounding: nearest multiple of `divisor`, at most 10% below `v`."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def block_configs(width: float = 1.0) -> list[dict]:
    """Per-block config (Keras block ids 0..16): expansion, output channels, stride."""
    configs = []
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            configs.append(
                dict(
                    expansion=t,
                    filters=make_divisible(int(c * width), 8),
                    stride=s if i == 0 else 1,
                )
            )
    return configs


def output_channels(width: float = 1.0) -> int:
    return block_configs(width)[-1]["filters"]


class MobileNetV2Encoder(nn.Module):
    """MobileNetV2 features up to block_16 (320 * width channels), stride 32.

    `__call__(x [B, H, W, 3], train) -> [B, H/32, W/32, C]`. Inputs are expected in
    [-1, 1] for Keras ImageNet weights.
    """

    width: float = 1.0
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.9

    def _bn(self, name: str, train: bool, activation: str | None = "relu6") -> BatchNorm:
        # BatchNorm with the ReLU6 fused in (same variables as nn.BatchNorm).
        return BatchNorm(
            use_running_average=not train,
            epsilon=self.bn_epsilon,
            momentum=self.bn_momentum,
            activation=activation,
            name=name,
        )

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        first = make_divisible(32 * self.width, 8)
        x = PatchConv(first, 3, strides=2, padding="SAME", name="Conv1")(x)
        x = self._bn("bn_Conv1", train)(x)
        for block_id, cfg in enumerate(block_configs(self.width)):
            x = self._inverted_residual(x, block_id, train, **cfg)
        return x

    def _inverted_residual(
        self, x: Array, block_id: int, train: bool, *, expansion: int, filters: int, stride: int
    ) -> Array:
        inputs = x
        in_channels = x.shape[-1]
        prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
        if block_id:
            x = PointwiseConv(expansion * in_channels, name=prefix + "expand")(x)
            x = self._bn(prefix + "expand_BN", train)(x)
        x = DepthwiseConv(3, strides=stride, padding="SAME", name=prefix + "depthwise")(x)
        x = self._bn(prefix + "depthwise_BN", train)(x)
        x = PointwiseConv(filters, name=prefix + "project")(x)
        x = self._bn(prefix + "project_BN", train, activation=None)(x)
        if in_channels == filters and stride == 1:
            x = x + inputs
        return x
