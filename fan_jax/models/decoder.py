"""Deconvolution decoder and heatmap head (Simple Baselines style)."""

from __future__ import annotations

import jax
from flax import linen as nn

from fan_jax.models.layers import BatchNorm, ConvTranspose, PointwiseConv

Array = jax.Array

# The reference code initialises deconvs and the head with N(0, 0.001), head bias 0.
deconv_init = nn.initializers.normal(stddev=0.001)
head_init = nn.initializers.normal(stddev=0.001)


class DeconvDecoder(nn.Module):
    """`num_layers` x [ConvTranspose (no bias) -> BatchNorm -> ReLU], each doubling H and W.

    Transposed convs follow PyTorch's `ConvTranspose2d(k, 2, torch_padding)`: the student uses
    k=2, p=0, the teacher k=4, p=1. Returns (features, taps), taps the post-ReLU output of
    every block. BN momentum 0.9 is PyTorch's 0.1.
    """

    channels: int = 128
    kernel_size: int = 2
    num_layers: int = 3
    torch_padding: int | None = (
        None  # None: 0 for k=2, 1 for k=4, 1 for k=3 (with output_padding 1)
    )
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9

    def _padding(self) -> tuple[int, int]:
        if self.torch_padding is not None:
            return self.torch_padding, 0
        # Simple Baselines' get_deconv_cfg: the output is exactly 2x the input.
        return {2: (0, 0), 3: (1, 1), 4: (1, 0)}[self.kernel_size]

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, tuple[Array, ...]]:
        padding, output_padding = self._padding()
        taps = []
        for i in range(self.num_layers):
            x = ConvTranspose(
                self.channels,
                self.kernel_size,
                strides=2,
                torch_padding=padding,
                output_padding=output_padding,
                kernel_init=deconv_init,
                name=f"deconv_{i}",
            )(x)
            x = BatchNorm(
                use_running_average=not train,
                epsilon=self.bn_epsilon,
                momentum=self.bn_momentum,
                activation="relu",
                name=f"bn_{i}",
            )(x)
            taps.append(x)
        return x, tuple(taps)


class HeatmapHead(nn.Module):
    """1x1 conv with bias to one heatmap per landmark."""

    num_landmarks: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return PointwiseConv(
            self.num_landmarks,
            use_bias=True,
            kernel_init=head_init,
            bias_init=nn.initializers.zeros_init(),
            name="conv",
        )(x)
