"""Keras EfficientNet weights -> `EfficientNetEncoder` variables (the KD-Loss teachers' init).

Sources: an in-memory `keras.Model` (e.g. `keras.applications.EfficientNetB3(weights=None,
include_top=False)`, or a model containing one), or a weight file as users download it
(`efficientnetb3_notop.h5`, with or without the classifier; a Keras 3 `.weights.h5`; a saved
`.keras` model). The name-driven mapping and its checks are `fan_jax.pretrained`'s
`keras_to_variables`: our encoder names its submodules after the Keras layers.

Keras's input `Rescaling` and `Normalization` layers are not converted: the encoder takes
`fan_jax.landmarks.normalize` output (see `fan_jax.models.efficientnet`).
`keras_input_normalization` reads the Normalization layer's statistics for callers that
must reproduce a particular Keras model's preprocessing.

Keras is imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fan_jax import pretrained
from fan_jax.models.efficientnet import VARIANTS, EfficientNetEncoder

Variables = dict[str, Any]


def load_keras_efficientnet(
    source: Any, variant: str = "b3", encoder: EfficientNetEncoder | None = None
) -> Variables:
    """`{'params', 'batch_stats'}` for `EfficientNetEncoder(variant)` from Keras weights."""
    encoder = encoder if encoder is not None else EfficientNetEncoder(variant=variant)
    model = _as_keras_model(source, encoder.variant)
    return pretrained.keras_to_variables(
        model,
        encoder,
        bn_epsilon=encoder.bn_epsilon,
        what=f"EfficientNetEncoder({encoder.variant!r})",
    )


def init_encoder_from_keras(model: Any, variables: Mapping[str, Any], source: Any) -> Variables:
    """Loads Keras weights into the `encoder` (an `EfficientNetEncoder`) of a full model."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, EfficientNetEncoder):
        raise TypeError(
            f"{type(model).__name__}.encoder is {type(encoder).__name__}, "
            "not an EfficientNetEncoder"
        )
    return pretrained.merge_encoder_variables(
        variables, load_keras_efficientnet(source, encoder=encoder), name="encoder"
    )


def keras_input_normalization(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """(mean, variance) of the Keras model's input `Normalization` layer (per channel).

    The Keras model maps raw pixels x to `(x / 255 - mean) / sqrt(variance)` before its stem
    (plus `1 / sqrt(IMAGENET_STD)` when built with `weights='imagenet'`).
    """
    layers = [m for m in _all_layers(model) if type(m).__name__ == "Normalization"]
    if len(layers) != 1:
        raise ValueError(f"expected one Normalization layer, found {len(layers)}")
    layer = layers[0]
    mean = np.asarray(layer.mean, np.float64).reshape(-1)
    var = np.asarray(layer.variance, np.float64).reshape(-1)
    return mean, var


def _all_layers(model: Any) -> list:
    out = []

    def visit(layer):
        for sub in getattr(layer, "layers", []):
            out.append(sub)
            visit(sub)

    visit(model)
    return out


def _build(variant: str, include_top: bool):
    import keras

    fn = getattr(keras.applications, f"EfficientNet{variant.upper()}")
    shape = None if include_top else (224, 224, 3)
    return fn(weights=None, include_top=include_top, input_shape=shape)


def _as_keras_model(source: Any, variant: str) -> Any:
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet variant {variant!r}")
    if not isinstance(source, (str, os.PathLike)):
        if not hasattr(source, "layers"):
            raise TypeError(f"expected a keras.Model or a weight file path, got {type(source)}")
        return source
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Keras weight file not found: {path}")
    if path.endswith(".keras"):
        import keras

        return keras.saving.load_model(path, compile=False)
    include_top = False
    if path.endswith(".h5") and not path.endswith(".weights.h5"):
        # Legacy HDF5 loads by layer order: the model must have the file's classifier or not.
        include_top = _legacy_h5_has_classifier(path)
    model = _build(variant, include_top)
    try:
        model.load_weights(path)
    except Exception as e:
        raise ValueError(
            f"could not load {path} into keras EfficientNet{variant.upper()} "
            f"(include_top={include_top}): {e}"
        ) from e
    return model


def _legacy_h5_has_classifier(path: str) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        if "layer_names" not in f.attrs and "model_weights" in f:
            f = f["model_weights"]
        names = [
            n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs.get("layer_names", [])
        ]
    return "predictions" in names
