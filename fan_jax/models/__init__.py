"""Networks: MobileNetV2 / ResNet encoders, deconv decoder, heatmap head, KD adapters."""

from collections.abc import Mapping
from typing import Any

from fan_jax.models.decoder import DeconvDecoder, HeatmapHead
from fan_jax.models.fan import (
    FAN,
    MODELS,
    Adapters,
    build_model,
    mobilefan,
    mobilefan_half,
    resnet18_fan,
    teacher_channels,
    teacher_resnet50,
)
from fan_jax.models.layers import ConvTranspose, DepthwiseConv, PointwiseConv
from fan_jax.models.mobilenet_v2 import MobileNetV2Encoder


def build(model_config: Mapping[str, Any], num_landmarks: int) -> Any:
    """The network a config's (or a record's) `model` section names, of either kind:
    'heatmap' (fan.MODELS) or 'regression' (regression.REGRESSORS, KD-Loss)."""
    kind = model_config.get("kind", "heatmap")
    if kind == "regression":
        from fan_jax.models import regression

        return regression.build_regressor(
            model_config["name"], num_landmarks, **regression.config_kwargs(model_config)
        )
    if kind != "heatmap":
        raise ValueError(f"model.kind must be 'heatmap' or 'regression', got {kind!r}")
    return build_model(model_config["name"], num_landmarks)


__all__ = [
    "FAN",
    "MODELS",
    "Adapters",
    "ConvTranspose",
    "DeconvDecoder",
    "DepthwiseConv",
    "HeatmapHead",
    "MobileNetV2Encoder",
    "PointwiseConv",
    "build",
    "build_model",
    "mobilefan",
    "mobilefan_half",
    "resnet18_fan",
    "teacher_channels",
    "teacher_resnet50",
]
