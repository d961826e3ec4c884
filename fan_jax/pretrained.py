"""Keras ImageNet weights -> our encoders' ``{'params', 'batch_stats'}``.

Sources, for both ``load_keras_mobilenet_v2`` and ``load_keras_resnet50``:

* an in-memory ``keras.Model`` (e.g. ``keras.applications.MobileNetV2(weights=None,
  include_top=False, input_shape=(256, 256, 3), alpha=1.0)`` after training or loading), or any
  model that contains one as a nested sub-model;
* a weight file as users download it for ImageNet init, e.g.
  ``mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5`` or
  ``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`` (legacy Keras HDF5, with or without the
  classifier), a Keras 3 ``.weights.h5``, or a saved ``.keras`` model. The Keras model is built with
  ``weights=None`` and the file is loaded into it with ``load_weights``, then converted.

The mapping is driven by our module's parameter tree: the flax module at path ``(a, b)`` takes the
weights of the Keras layer named ``a_b`` (the encoders name their submodules after Keras layers).
Keras layers past the truncation point (MobileNetV2's ``Conv_1``, the classifier) are ignored.
Layouts: Conv2D kernels are HWIO in both; DepthwiseConv2D kernels (3, 3, C, 1) become (3, 3, 1, C);
BatchNormalization gamma/beta/moving_mean/moving_variance become params scale/bias and batch_stats
mean/var.

Keras is imported lazily: importing this module does not load TensorFlow.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from fan_jax.errors import FanJaxError
from fan_jax.models.mobilenet_v2 import MobileNetV2Encoder
from fan_jax.models.resnet import KERAS_BN_EPS, ResNetEncoder

Variables = dict[str, Any]

# Our param shapes do not depend on the image size; any size the encoder accepts will do.
_PROBE_SHAPE = (1, 64, 64, 3)
# Keras may hold BN epsilon as float32 (1.001e-5 is not exact there).
_EPS_RTOL = 1e-3


def load_keras_mobilenet_v2(source: Any, width: float = 1.0) -> Variables:
    """Variables for ``MobileNetV2Encoder(width)`` from a Keras MobileNetV2 (model or weight file).

    ``width`` is Keras's ``alpha``. Returns ``{'params': ..., 'batch_stats': ...}``.
    """
    return _load_encoder(MobileNetV2Encoder(width=width), source)


def load_keras_resnet50(source: Any) -> Variables:
    """Variables for ``ResNetEncoder(50, keras_style=True)`` from a Keras ResNet50."""
    return _load_encoder(ResNetEncoder(depth=50, keras_style=True), source)


def _load_encoder(encoder: Any, source: Any) -> Variables:
    import keras

    if isinstance(encoder, MobileNetV2Encoder):
        width = encoder.width

        def build(include_top: bool):
            return keras.applications.MobileNetV2(
                weights=None, include_top=include_top, input_shape=(224, 224, 3), alpha=width
            )

        description = f"keras.applications.MobileNetV2(alpha={width})"
        bn_epsilon = encoder.bn_epsilon
    elif isinstance(encoder, ResNetEncoder):
        if encoder.depth != 50 or not encoder.keras_style:
            raise ValueError(
                f"Keras ImageNet weights exist here for ResNetEncoder(50, keras_style=True) only, "
                f"got depth={encoder.depth}, keras_style={encoder.keras_style} (torchvision-style "
                f"ResNets stride a different conv and have no conv biases)"
            )

        def build(include_top: bool):
            shape = (224, 224, 3) if include_top else None
            return keras.applications.ResNet50(
                weights=None, include_top=include_top, input_shape=shape
            )

        description = "keras.applications.ResNet50"
        bn_epsilon = KERAS_BN_EPS
    else:
        raise TypeError(f"no Keras weight source for encoder {type(encoder).__name__}")
    model = _as_keras_model(source, build, description)
    if not isinstance(source, (str, os.PathLike)):
        return keras_to_variables(model, encoder, bn_epsilon=bn_epsilon, what=describe(encoder))
    try:
        return keras_to_variables(model, encoder, bn_epsilon=bn_epsilon, what=describe(encoder))
    except ValueError as e:
        raise WeightFileError(f"{os.fspath(source)}: {e}") from e


def describe(encoder: Any) -> str:
    """The encoder as it is named in messages, e.g. 'MobileNetV2Encoder(width=0.5)'."""
    if isinstance(encoder, MobileNetV2Encoder):
        return f"MobileNetV2Encoder(width={encoder.width})"
    if isinstance(encoder, ResNetEncoder):
        return f"ResNetEncoder({encoder.depth}, keras_style={encoder.keras_style})"
    return type(encoder).__name__


def keras_to_variables(
    model: Any, module: Any, *, bn_epsilon: float | None = None, what: str | None = None
) -> Variables:
    """Converts the weights of Keras ``model`` into variables for flax ``module``.

    Every parameter and batch statistic of ``module`` must be filled from a Keras layer; shapes
    are checked leaf by leaf. ``bn_epsilon``, if given, is checked against each Keras BN layer used
    (a different epsilon would load silently and give different outputs).
    """
    what = what or type(module).__name__
    modules = _target_modules(module)
    layers, duplicates = _layers_by_name(model)
    ambiguous = sorted(n for n in ("_".join(p) for p in modules) if n in duplicates)
    if ambiguous:
        raise ValueError(
            f"{what}: the Keras model holds several layers named {ambiguous[0]!r} "
            f"(nested sub-models?); pass the sub-model to convert instead"
        )
    missing_layers = sorted("_".join(p) for p in modules if "_".join(p) not in layers)
    if missing_layers:
        shown = ", ".join(repr(n) for n in missing_layers[:5])
        more = f" and {len(missing_layers) - 5} more" if len(missing_layers) > 5 else ""
        raise ValueError(
            f"{what}: the Keras model has no layer named {shown}{more} ({len(missing_layers)} of "
            f"the {len(modules)} layers the flax module needs). Is it the right architecture?"
        )

    # In network order, so that a width mismatch is reported at the first layer it shows in.
    order = {name: i for i, name in enumerate(layers)}
    out: dict[tuple[str, ...], np.ndarray] = {}
    for module_path in sorted(modules, key=lambda p: order["_".join(p)]):
        expected = modules[module_path]
        name = "_".join(module_path)
        layer = layers[name]
        got = _layer_variables(layer, bn_epsilon)
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        if missing or extra:
            raise ValueError(
                f"{what}: Keras layer {name!r} ({type(layer).__name__}) provides "
                f"{_fmt_keys(got)} but the flax module expects {_fmt_keys(expected)} "
                f"(missing {_fmt_keys(missing)}, unexpected {_fmt_keys(extra)})"
            )
        for key, value in got.items():
            want = tuple(expected[key].shape)
            if tuple(value.shape) != want:
                raise ValueError(
                    f"{what}: Keras layer {name!r} {key[1]!r} ({key[0]}) has shape "
                    f"{tuple(value.shape)}, expected {want}. Does the Keras model's width "
                    f"(alpha) or depth match?"
                )
            out[(key[0], *module_path, key[1])] = value.astype(np.float32)

    nested: dict[str, dict] = {}
    for (collection, *path), value in out.items():
        nested.setdefault(collection, {})[tuple(path)] = jnp.asarray(value)
    return {c: traverse_util.unflatten_dict(tree) for c, tree in nested.items()}


@functools.lru_cache(maxsize=16)
def _target_modules(module: Any) -> dict[tuple[str, ...], dict[tuple[str, str], Any]]:
    """module path -> {(collection, leaf name): ShapeDtypeStruct} of ``module``'s variables."""
    target = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros(_PROBE_SHAPE, jnp.float32), train=False)
    )
    modules: dict[tuple[str, ...], dict[tuple[str, str], Any]] = {}
    for collection, tree in unfreeze(target).items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            modules.setdefault(path[:-1], {})[(collection, path[-1])] = leaf
    return modules


def merge_encoder_variables(
    variables: Mapping[str, Any], encoder_variables: Mapping[str, Any], name: str = "encoder"
) -> Variables:
    """Returns a copy of a full model's ``variables`` with the ``name`` submodule replaced.

    Every collection of ``encoder_variables`` must match ``variables[collection][name]`` exactly
    in tree structure and shapes (so a width or depth mismatch fails here, not at apply time).
    """
    variables = unfreeze(dict(variables))
    encoder_variables = unfreeze(dict(encoder_variables))
    merged = dict(variables)
    for collection, tree in encoder_variables.items():
        if collection not in variables or name not in variables[collection]:
            raise ValueError(
                f"the model's variables have no {collection}/{name} subtree "
                f"(collections: {sorted(variables)})"
            )
        old = traverse_util.flatten_dict(variables[collection][name])
        new = traverse_util.flatten_dict(tree)
        missing = sorted(set(old) - set(new))
        extra = sorted(set(new) - set(old))
        if missing or extra:
            raise ValueError(
                f"{collection}/{name}: encoder variables do not match the model's: missing "
                f"{['/'.join(p) for p in missing[:5]]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {['/'.join(p) for p in extra[:5]]}{'...' if len(extra) > 5 else ''}"
            )
        for path, value in new.items():
            if tuple(np.shape(value)) != tuple(np.shape(old[path])):
                raise ValueError(
                    f"{collection}/{name}/{'/'.join(path)}: shape {tuple(np.shape(value))} from "
                    f"the encoder, {tuple(np.shape(old[path]))} in the model"
                )
            if jnp.result_type(value) != jnp.result_type(old[path]):
                new[path] = jnp.asarray(value, jnp.result_type(old[path]))
        merged[collection] = {**variables[collection], name: traverse_util.unflatten_dict(new)}
    return merged


def init_encoder_from_keras(model: Any, variables: Mapping[str, Any], source: Any) -> Variables:
    """Loads Keras ImageNet weights into the encoder of a full model's ``variables``.

    ``model`` is the flax model (e.g. ``fan_jax.models.build_model('mobilefan', 98)``) whose
    ``encoder`` attribute says which Keras network and width to read: a ``MobileNetV2Encoder``, or
    ``ResNetEncoder(50, keras_style=True)`` (the teacher's default). Its parameters live under
    ``'encoder'`` in ``variables``.
    """
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise ValueError(f"{type(model).__name__} has no 'encoder' submodule")
    if not isinstance(source, (str, os.PathLike)):
        return merge_encoder_variables(variables, _load_encoder(encoder, source), name="encoder")
    try:
        return merge_encoder_variables(variables, _load_encoder(encoder, source), name="encoder")
    except (WeightFileError, FileNotFoundError):
        raise
    except (ValueError, TypeError) as e:
        raise WeightFileError(
            f"{os.fspath(source)}: cannot initialise {describe(encoder)}: {e}"
        ) from e


# --------------------------------------------------------------------------- helpers


class WeightFileError(FanJaxError, ValueError):
    """A Keras weight file that cannot initialise the encoder; the message names the file."""


_NO_TOP_HINT = (
    "use the 'no top' ImageNet file (e.g. "
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5 or "
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5, or a model built with "
    "include_top=False)"
)


def _as_keras_model(source: Any, build, description: str) -> Any:
    if not isinstance(source, (str, os.PathLike)):
        if not hasattr(source, "layers"):
            raise TypeError(f"expected a keras.Model or a weight file path, got {type(source)}")
        return source
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Keras weight file not found: {path} (expected {description} "
            f"weights without the classifier, .h5 or .keras)"
        )
    if path.endswith(".keras"):
        import keras

        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as e:
            raise WeightFileError(
                f"{path}: not a loadable Keras model (expected {description} "
                f"saved with model.save): {type(e).__name__}: {e}"
            ) from e
        if "predictions" in _layers_by_name(model)[0]:
            raise WeightFileError(
                f"{path}: the model includes the ImageNet classifier "
                f"('predictions' layer); {_NO_TOP_HINT}"
            )
        return model
    # A legacy HDF5 file loads by layer order, so the model must have the file's layers.
    legacy_h5 = path.endswith(".h5") and not path.endswith(".weights.h5")
    if legacy_h5 and _legacy_h5_has_classifier(path):
        raise WeightFileError(
            f"{path}: the file includes the ImageNet classifier "
            f"('predictions' layer); {_NO_TOP_HINT}"
        )
    model = build(False)
    try:
        model.load_weights(path)
    except Exception as e:
        raise WeightFileError(
            f"{path}: could not be loaded into {description} without the classifier (wrong "
            f"architecture or width, a file with the classifier, or not a Keras weight file): "
            f"{type(e).__name__}: {str(e)[:300]}"
        ) from e
    return model


def _legacy_h5_has_classifier(path: str) -> bool:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightFileError(
            f"{path}: not an HDF5 file (corrupt or truncated download?): {e}"
        ) from e
    with f:
        if "layer_names" not in f.attrs and "model_weights" in f:
            f = f["model_weights"]
        names = [
            n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs.get("layer_names", [])
        ]
    return "predictions" in names


def _layers_by_name(model: Any) -> tuple[dict[str, Any], set[str]]:
    """All layers of ``model``, nested sub-models included, by name; and the names seen twice."""
    found: dict[str, Any] = {}
    duplicates: set[str] = set()

    def visit(layer):
        for sub in getattr(layer, "layers", []):
            if sub.name in found and found[sub.name] is not sub:
                duplicates.add(sub.name)
            found[sub.name] = sub
            visit(sub)

    visit(model)
    return found, duplicates


def _to_numpy(variable) -> np.ndarray:
    if hasattr(variable, "numpy"):
        return np.array(variable.numpy())
    import keras

    return np.array(keras.ops.convert_to_numpy(variable))


def _layer_variables(layer, bn_epsilon: float | None) -> dict[tuple[str, str], np.ndarray]:
    kind = type(layer).__name__
    if kind == "BatchNormalization":
        if not (layer.center and layer.scale):
            raise ValueError(f"Keras BN layer {layer.name!r} lacks beta or gamma")
        if bn_epsilon is not None and not np.isclose(layer.epsilon, bn_epsilon, rtol=_EPS_RTOL):
            raise ValueError(
                f"Keras BN layer {layer.name!r} has epsilon {layer.epsilon}, "
                f"the flax module uses {bn_epsilon}"
            )
        return {
            ("params", "scale"): _to_numpy(layer.gamma),
            ("params", "bias"): _to_numpy(layer.beta),
            ("batch_stats", "mean"): _to_numpy(layer.moving_mean),
            ("batch_stats", "var"): _to_numpy(layer.moving_variance),
        }
    if kind == "DepthwiseConv2D":
        kernel = _to_numpy(layer.kernel)
        if kernel.shape[-1] != 1:
            raise ValueError(
                f"Keras layer {layer.name!r}: depth_multiplier "
                f"{kernel.shape[-1]} is not supported (only 1)"
            )
        out = {("params", "kernel"): kernel.transpose(0, 1, 3, 2)}
    elif kind in ("Conv2D", "Dense"):
        out = {("params", "kernel"): _to_numpy(layer.kernel)}
    else:
        raise ValueError(f"Keras layer {layer.name!r} has unsupported type {kind}")
    if getattr(layer, "use_bias", False):
        out[("params", "bias")] = _to_numpy(layer.bias)
    return out


def _fmt_keys(keys) -> str:
    return "[" + ", ".join(f"{c}/{n}" for c, n in sorted(keys)) + "]"
