"""Networks: MobileNetV2 / ResNet encoders, deconv decoder, heatmap head, KD adapters."""

from fan_jax.models.decoder import DeconvDecoder, HeatmapHead
from fan_jax.models.fan import (FAN, MODELS, Adapters, build_model, mobilefan, mobilefan_half,
                                resnet18_fan, teacher_channels, teacher_resnet50)
from fan_jax.models.layers import ConvTranspose, DepthwiseConv, PointwiseConv
from fan_jax.models.mobilenet_v2 import MobileNetV2Encoder

__all__ = [
    "FAN", "MODELS", "Adapters", "build_model", "mobilefan", "mobilefan_half", "resnet18_fan",
    "teacher_channels", "teacher_resnet50", "DeconvDecoder", "HeatmapHead", "ConvTranspose",
    "DepthwiseConv", "PointwiseConv", "MobileNetV2Encoder",
]
