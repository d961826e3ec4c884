"""Full heatmap networks: encoder -> deconv decoder -> 1x1 heatmap head, and the KD adapters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import linen as nn

from fan_jax.models.decoder import DeconvDecoder, HeatmapHead
from fan_jax.models.layers import BatchNorm, PointwiseConv
from fan_jax.models.mobilenet_v2 import MobileNetV2Encoder

Array = jax.Array


class FAN(nn.Module):
    """Face alignment network. `__call__(images [B,H,W,3], train) -> (heatmaps, taps)`.

    For 256x256 inputs: heatmaps [B, 64, 64, L]; taps are the three post-ReLU decoder
    outputs at 16x16, 32x32 and 64x64. Parameters live under 'encoder', 'decoder', 'head'.
    """

    encoder: nn.Module
    decoder: nn.Module
    head: nn.Module

    def __call__(self, images: Array, train: bool = False) -> tuple[Array, tuple[Array, ...]]:
        x = self.encoder(images, train=train)
        x, taps = self.decoder(x, train=train)
        return self.head(x), taps


class Adapters(nn.Module):
    """Student-side adapters mapping each student tap to the teacher's channel count.

    kind 'conv': a 1x1 conv with bias (the paper); 'conv_bn_relu': 1x1 conv without bias ->
    BN -> ReLU (the authors' public code). A separate module so an exported student has
    none of these parameters.
    """

    features: Sequence[int] = (256, 256, 256)
    kind: str = "conv"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, taps: Sequence[Array], train: bool = False) -> tuple[Array, ...]:
        if self.kind not in ("conv", "conv_bn_relu"):
            raise ValueError(
                f"unknown adapter kind {self.kind!r}; expected 'conv' or 'conv_bn_relu'"
            )
        if len(taps) != len(self.features):
            raise ValueError(f"{len(taps)} taps for {len(self.features)} adapters")
        out = []
        for i, (tap, feats) in enumerate(zip(taps, self.features)):
            if self.kind == "conv":
                y = PointwiseConv(feats, use_bias=True, name=f"adapter_{i}")(tap)
            else:
                y = PointwiseConv(feats, use_bias=False, name=f"adapter_{i}_conv")(tap)
                y = BatchNorm(
                    use_running_average=not train,
                    momentum=self.bn_momentum,
                    epsilon=self.bn_epsilon,
                    activation="relu",
                    name=f"adapter_{i}_bn",
                )(y)
            out.append(y)
        return tuple(out)


def mobilefan(num_landmarks: int, decoder_channels: int = 128, width: float = 1.0) -> FAN:
    """MobileFAN: MobileNetV2 (to 320 ch) + 3 x [deconv k2 s2 -> BN -> ReLU] + 1x1 head."""
    return FAN(
        encoder=MobileNetV2Encoder(width=width),
        decoder=DeconvDecoder(decoder_channels, kernel_size=2, num_layers=3),
        head=HeatmapHead(num_landmarks),
    )


def mobilefan_half(num_landmarks: int) -> FAN:
    """MobileFAN (0.5): the paper's channel-halved decoder (64 channels), full-width encoder."""
    return mobilefan(num_landmarks, decoder_channels=64)


def mobilefan_narrow(num_landmarks: int) -> FAN:
    """MobileFAN on a MobileNetV2 (0.5) encoder (Keras alpha 0.5): not in the paper; a lighter
    student that still takes ImageNet weights (mobilenet_v2_..._0.5_224_no_top.h5)."""
    return mobilefan(num_landmarks, width=0.5)


def _resnet_fan(depth: int, num_landmarks: int, keras_style: bool) -> FAN:
    # Imported here so the students work even where resnet.py is absent or broken.
    from fan_jax.models.resnet import ResNetEncoder

    return FAN(
        encoder=ResNetEncoder(depth=depth, keras_style=keras_style),
        decoder=DeconvDecoder(256, kernel_size=4, num_layers=3),
        head=HeatmapHead(num_landmarks),
    )


def teacher_resnet50(num_landmarks: int, keras_style: bool = True) -> FAN:
    """Simple Baselines PoseResNet-50: ResNet-50 + 3 x [deconv k4 s2 p1 (256) -> BN -> ReLU].

    `keras_style=True` (default) matches Keras's ResNet50, the ImageNet weight source
    (`fan_jax.pretrained`); False gives torchvision's layout.
    """
    return _resnet_fan(50, num_landmarks, keras_style)


def resnet18_fan(num_landmarks: int) -> FAN:
    """Simple Baselines PoseResNet-18 (torchvision layout): a small teacher for quick runs."""
    return _resnet_fan(18, num_landmarks, keras_style=False)


MODELS: dict[str, Callable[[int], FAN]] = {
    "mobilefan": mobilefan,
    "mobilefan_0.5": mobilefan_half,
    "mobilefan_w0.5": mobilefan_narrow,
    "teacher": teacher_resnet50,
    "resnet18_fan": resnet18_fan,
}


def build_model(name: str, num_landmarks: int, **kwargs: Any) -> FAN:
    """Model registry: 'mobilefan', 'mobilefan_0.5', 'teacher', 'resnet18_fan'."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](num_landmarks, **kwargs)


def teacher_channels(model: FAN) -> tuple[int, ...]:
    """Channel counts of a model's taps (the adapters' output features when it teaches)."""
    return (model.decoder.channels,) * model.decoder.num_layers
