"""EfficientNet encoders (B0-B7 layouts; B3 is the KD-Loss teacher), pure flax.linen.

The stack is `keras.applications.EfficientNetB*(include_top=False)` from its `stem_conv_pad`
layer to `top_activation`: stem conv + BN + swish, the MBConv blocks (expand 1x1, depthwise
k x k, squeeze-and-excitation, project 1x1, drop-connect + residual), then the 1x1 `top_conv`
to round(1280 * width) channels + BN + swish. Output stride 32; B3 gives 1536 channels.

Input preprocessing is *not* part of the module. Keras puts `Rescaling(1/255)` and a
`Normalization` layer (mean/variance held as weights) in front of the stem; here, like the
other encoders of this package, the input is what `fan_jax.landmarks.normalize` gives
(ImageNet mean/std), so one data pipeline feeds every model. The Keras model on raw pixels
`x` equals this encoder on `(x / 255 - mean) / sqrt(variance)` with the Keras layer's
statistics (see `fan_jax.pretrained_efficientnet.keras_input_normalization`). With
`weights='imagenet'` Keras's Normalization holds the ImageNet mean and std^2 and a further
`Rescaling(1 / sqrt(IMAGENET_STD))` follows (tensorflow/tensorflow#49930 compatibility), so
its stem sees `normalize(x) / sqrt(IMAGENET_STD)`: `input_scale=KERAS_IMAGENET_INPUT_SCALE`
reproduces that, and ImageNet weights see the inputs they were trained with.

Submodules are named after the Keras layers ('stem_conv', 'stem_bn', 'block1a_dwconv',
'block1a_se_reduce', ..., 'top_bn'), all at the top level, so the weight import is a name
mapping. Depthwise kernels are (k, k, 1, C) (Keras: (k, k, C, 1)); BN 'scale'/'bias'/'mean'/
'var' for gamma/beta/moving_mean/moving_variance. Stride-2 depthwise convs pad like Keras's
`correct_pad` (equal to TF 'SAME' for a known input size). BN epsilon 1e-3 and momentum 0.99
are Keras's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fan_jax.models.layers import DepthwiseConv, PointwiseConv

Array = jax.Array

IMAGENET_STD = (0.229, 0.224, 0.225)
KERAS_IMAGENET_INPUT_SCALE = tuple(1.0 / math.sqrt(s) for s in IMAGENET_STD)

# (kernel, repeats, filters_in, filters_out, expand_ratio, strides) for B0; SE ratio 0.25 and
# the identity skip everywhere, as in keras.applications.efficientnet.DEFAULT_BLOCKS_ARGS.
BASE_BLOCKS = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
SE_RATIO = 0.25

# variant -> (width_coefficient, depth_coefficient), keras.applications.EfficientNetB0..B7.
VARIANTS = {
    "b0": (1.0, 1.0),
    "b1": (1.0, 1.1),
    "b2": (1.1, 1.2),
    "b3": (1.2, 1.4),
    "b4": (1.4, 1.8),
    "b5": (1.6, 2.2),
    "b6": (1.8, 2.6),
    "b7": (2.0, 3.1),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Keras's channel rounding: nearest multiple of `divisor`, at most 10% below."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def block_configs(variant: str = "b3") -> list[dict]:
    """Per-block settings with Keras's block names ('block1a', 'block1b', ...)."""
    width, depth = VARIANTS[variant]
    out = []
    for i, (k, reps, f_in, f_out, expand, stride) in enumerate(BASE_BLOCKS):
        f_in, f_out = round_filters(f_in, width), round_filters(f_out, width)
        for j in range(round_repeats(reps, depth)):
            out.append(
                dict(
                    name=f"block{i + 1}{chr(j + 97)}",
                    kernel=k,
                    filters_in=f_in if j == 0 else f_out,
                    filters_out=f_out,
                    expand_ratio=expand,
                    strides=stride if j == 0 else 1,
                )
            )
    return out


def output_channels(variant: str = "b3") -> int:
    return round_filters(1280, VARIANTS[variant][0])


class EfficientNetEncoder(nn.Module):
    """EfficientNet features to `top_activation`: `[B, H, W, 3] -> [B, H/32, W/32, C]`.

    `train` switches BN to batch statistics and enables drop-connect (needs a 'dropout' rng).
    `input_scale`, if set, multiplies the (already normalised) input per channel first.
    """

    variant: str = "b3"
    drop_connect_rate: float = 0.2
    input_scale: Sequence[float] | None = None
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.99

    def _bn(self, name: str, train: bool) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train,
            epsilon=self.bn_epsilon,
            momentum=self.bn_momentum,
            name=name,
        )

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"unknown EfficientNet variant {self.variant!r}; expected one of {sorted(VARIANTS)}"
            )
        width, _ = VARIANTS[self.variant]
        if self.input_scale is not None:
            x = x * jnp.asarray(self.input_scale, x.dtype)
        x = nn.Conv(
            round_filters(32, width),
            (3, 3),
            strides=(2, 2),
            padding="SAME",
            use_bias=False,
            name="stem_conv",
        )(x)
        x = nn.swish(self._bn("stem_bn", train)(x))
        configs = block_configs(self.variant)
        for b, cfg in enumerate(configs):
            x = self._block(x, train, drop_rate=self.drop_connect_rate * b / len(configs), **cfg)
        x = PointwiseConv(output_channels(self.variant), name="top_conv")(x)
        return nn.swish(self._bn("top_bn", train)(x))

    def _block(
        self,
        inputs: Array,
        train: bool,
        *,
        name: str,
        kernel: int,
        filters_in: int,
        filters_out: int,
        expand_ratio: int,
        strides: int,
        drop_rate: float,
    ) -> Array:
        filters = filters_in * expand_ratio
        x = inputs
        if expand_ratio != 1:
            x = PointwiseConv(filters, name=f"{name}_expand_conv")(x)
            x = nn.swish(self._bn(f"{name}_expand_bn", train)(x))
        x = DepthwiseConv(kernel, strides=strides, padding="SAME", name=f"{name}_dwconv")(x)
        x = nn.swish(self._bn(f"{name}_bn", train)(x))
        # Squeeze-and-excitation; the bottleneck width follows the block's input channels.
        se = jnp.mean(x, axis=(1, 2), keepdims=True)
        se = nn.swish(
            PointwiseConv(
                max(1, int(filters_in * SE_RATIO)), use_bias=True, name=f"{name}_se_reduce"
            )(se)
        )
        se = nn.sigmoid(PointwiseConv(filters, use_bias=True, name=f"{name}_se_expand")(se))
        x = x * se
        x = PointwiseConv(filters_out, name=f"{name}_project_conv")(x)
        x = self._bn(f"{name}_project_bn", train)(x)
        if strides == 1 and filters_in == filters_out:
            if drop_rate > 0:
                # Drop-connect: the whole residual branch of a sample, as Keras's
                # Dropout(noise_shape=(None, 1, 1, 1)).
                x = nn.Dropout(
                    drop_rate,
                    broadcast_dims=(1, 2, 3),
                    deterministic=not train,
                    name=f"{name}_drop",
                )(x)
            x = x + inputs
        return x


def efficientnet_b3(**kwargs: Any) -> EfficientNetEncoder:
    """EfficientNet-B3 encoder (1536 output channels)."""
    return EfficientNetEncoder(variant="b3", **kwargs)
