"""ResNet encoders (no pooling, no classifier), output stride 32.

Two conventions, chosen by ``keras_style``:

* torchvision (default): ResNet v1.5, the stride of a bottleneck sits in its 3x3 conv; convs have
  no bias; BatchNorm eps 1e-5.
* Keras (``keras_style=True``), matching ``keras.applications.ResNet50/101/152`` so that the
  ImageNet weights load exactly (see ``fan_jax.pretrained``): ResNet v1, the stride sits in the
  first 1x1 conv of each stage's first block; every conv has a bias; BatchNorm eps 1.001e-5.

Padding is the same in both styles and always symmetric, because both sources pad symmetrically:
the 7x7/2 stem conv pads 3 on every side (torchvision ``padding=3``; Keras ZeroPadding2D(3) then a
'valid' conv), the 3x3/2 max-pool pads 1 on every side (torchvision pads with -inf, Keras with
zeros; after the ReLU every value is >= 0 and every window holds one real pixel, so the two agree),
and 3x3 convs pad 1 on every side (torchvision ``padding=1``; Keras only uses 3x3 convs with stride
1, where 'SAME' is symmetric). flax's 'SAME' would pad stride-2 convs (0, 1) on even inputs, which
matches neither, hence the explicit padding.

Module names follow the Keras layer names, so that a Keras layer ``conv3_block1_2_conv`` is the flax
module at path ``('conv3_block1', '2_conv')``: the Keras name is the flax path joined with '_'.
BatchNorm momentum 0.9 is PyTorch's momentum 0.1 (Keras ResNet uses 0.99; it only matters for
training, where we follow the PyTorch recipe).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from fan_jax.models.layers import PointwiseConv

# depth -> (block kind, blocks per stage)
STAGES: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)
BN_MOMENTUM = 0.9
TORCH_BN_EPS = 1e-5
KERAS_BN_EPS = 1.001e-5

# torchvision's init (kaiming normal, fan_out, relu gain); loading pretrained weights overrides it.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _subsample(x: jax.Array, stride: int) -> jax.Array:
    # A 1x1 'valid' conv with stride s reads exactly the pixels x[::s, ::s].
    return x if stride == 1 else x[:, ::stride, ::stride, :]


class _Block(nn.Module):
    """Shared helpers for the two block kinds."""

    keras_style: bool = False

    @property
    def eps(self) -> float:
        return KERAS_BN_EPS if self.keras_style else TORCH_BN_EPS

    def bn(self, name: str, train: bool) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=self.eps, name=name
        )

    def conv3x3(self, features: int, strides: int, name: str) -> nn.Conv:
        return nn.Conv(
            features,
            (3, 3),
            strides=(strides, strides),
            padding=((1, 1), (1, 1)),
            use_bias=self.keras_style,
            kernel_init=conv_init,
            name=name,
        )

    def conv1x1(self, x: jax.Array, features: int, strides: int, name: str) -> jax.Array:
        conv = PointwiseConv(features, use_bias=self.keras_style, kernel_init=conv_init, name=name)
        return conv(_subsample(x, strides))


class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34)."""

    features: int = 64
    strides: int = 1
    project: bool = False  # 1x1 conv + BN on the shortcut (channel or resolution change)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        shortcut = x
        if self.project:
            shortcut = self.conv1x1(x, self.features, self.strides, "0_conv")
            shortcut = self.bn("0_bn", train)(shortcut)
        y = self.conv3x3(self.features, self.strides, "1_conv")(x)
        y = nn.relu(self.bn("1_bn", train)(y))
        y = self.conv3x3(self.features, 1, "2_conv")(y)
        y = self.bn("2_bn", train)(y)
        return nn.relu(shortcut + y)


class Bottleneck(_Block):
    """1x1 reduce, 3x3, 1x1 expand (x4) (ResNet-50/101/152)."""

    features: int = 64  # inner width; the block outputs 4 * features
    strides: int = 1
    project: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_features = 4 * self.features
        # v1 (Keras) strides the first 1x1 conv, which throws away 3/4 of the pixels before
        # any 3x3 conv sees them; v1.5 (torchvision) strides the 3x3 conv instead.
        stride_1x1, stride_3x3 = (self.strides, 1) if self.keras_style else (1, self.strides)
        shortcut = x
        if self.project:
            shortcut = self.conv1x1(x, out_features, self.strides, "0_conv")
            shortcut = self.bn("0_bn", train)(shortcut)
        y = self.conv1x1(x, self.features, stride_1x1, "1_conv")
        y = nn.relu(self.bn("1_bn", train)(y))
        y = self.conv3x3(self.features, stride_3x3, "2_conv")(y)
        y = nn.relu(self.bn("2_bn", train)(y))
        y = self.conv1x1(y, out_features, 1, "3_conv")
        y = self.bn("3_bn", train)(y)
        return nn.relu(shortcut + y)


class ResNetEncoder(nn.Module):
    """ResNet trunk: [B, H, W, 3] -> [B, H/32, W/32, 512 (18/34) or 2048 (50+)].

    Attributes:
      depth: 18, 34, 50, 101 or 152.
      keras_style: Keras ResNet v1 conventions instead of torchvision's (see the module docstring).
    """

    depth: int = 50
    keras_style: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.depth not in STAGES:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGES)}, got {self.depth}")
        kind, counts = STAGES[self.depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        expansion = 1 if kind == "basic" else 4
        eps = KERAS_BN_EPS if self.keras_style else TORCH_BN_EPS

        x = nn.Conv(
            64,
            (7, 7),
            strides=(2, 2),
            padding=((3, 3), (3, 3)),
            use_bias=self.keras_style,
            kernel_init=conv_init,
            name="conv1_conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=eps, name="conv1_bn"
        )(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        in_features = 64
        for stage, (width, count) in enumerate(zip(STAGE_WIDTHS, counts)):
            for i in range(count):
                strides = 2 if (i == 0 and stage > 0) else 1
                project = i == 0 and (strides != 1 or in_features != width * expansion)
                x = block_cls(
                    features=width,
                    strides=strides,
                    project=project,
                    keras_style=self.keras_style,
                    name=f"conv{stage + 2}_block{i + 1}",
                )(x, train)
                in_features = width * expansion
        return x
