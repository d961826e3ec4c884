"""Keras -> flax weight import: our encoders reproduce the Keras networks they load.

Keras models get random weights, BatchNorm moving statistics included (a converter that swapped
mean and variance, or gamma and beta, would pass with Keras's default 0/1 statistics), and our
encoders in inference mode must match the Keras model truncated at the same layer.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import functools

import h5py
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import traverse_util

from fan_jax import pretrained
from fan_jax.models.fan import mobilefan, teacher_resnet50
from fan_jax.models.mobilenet_v2 import MobileNetV2Encoder
from fan_jax.models.resnet import ResNetEncoder

pytestmark = [
    # Loading a file into a model of the wrong width makes Keras warn once per layer, then fail.
    pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning"),
    # Keras's TF backend converts tensors with np.array(x, copy=False) internally.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept:DeprecationWarning"),
]

SIZE = 64  # the smallest size both Keras applications accept without weights is 32
ATOL = 1e-4


def randomize(model: keras.Model, seed: int) -> keras.Model:
    """Random weights everywhere, with BN statistics far from 0/1 and from each other."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(0.0, 0.2, c),
                    rng.normal(0.0, 0.2, c),
                    rng.uniform(0.5, 2.0, c),
                ]
            )
        elif layer.weights:
            new = []
            for w in layer.weights:
                shape = tuple(w.shape)
                if len(shape) == 4:  # conv kernels: keep activations O(1) through the stack
                    fan_in = np.prod(shape[:2]) * (
                        1 if isinstance(layer, keras.layers.DepthwiseConv2D) else shape[2]
                    )
                    new.append(rng.normal(0.0, np.sqrt(1.0 / fan_in), shape))
                else:
                    new.append(rng.normal(0.0, 0.1, shape))
            layer.set_weights(new)
    return model


@functools.cache
def keras_mobilenet_v2(alpha: float) -> keras.Model:
    model = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(SIZE, SIZE, 3), alpha=alpha
    )
    return randomize(model, seed=int(alpha * 10))


@functools.cache
def keras_resnet50() -> keras.Model:
    model = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)
    )
    return randomize(model, seed=50)


def run(module, variables, x):
    # jit: op-by-op dispatch of a whole encoder is several times slower than compiling it.
    return np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x))


def abstract_init(model, x):
    """Variables of the right structure without paying for (or compiling) random init."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def truncated(model: keras.Model, layer: str) -> keras.Model:
    return keras.Model(model.input, model.get_layer(layer).output)


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def assert_variables_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def images(seed: int, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    # Keras MobileNetV2 expects [-1, 1] inputs.
    return np.random.default_rng(seed).uniform(lo, hi, (2, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_mobilenet_v2_matches_keras(alpha):
    model = keras_mobilenet_v2(alpha)
    x = images(0)
    expected = np.asarray(truncated(model, "block_16_project_BN")(x, training=False))
    variables = pretrained.load_keras_mobilenet_v2(model, width=alpha)
    # BN really is exercised: the statistics loaded are far from the identity.
    var = np.asarray(variables["batch_stats"]["bn_Conv1"]["var"])
    assert np.abs(var - 1).max() > 0.2
    got = run(MobileNetV2Encoder(width=alpha), variables, x)
    assert got.shape == expected.shape == (2, SIZE // 32, SIZE // 32, 320 * alpha)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_resnet50_matches_keras():
    model = keras_resnet50()
    x = np.random.default_rng(1).normal(0.0, 1.0, (2, SIZE, SIZE, 3)).astype(np.float32)
    expected = np.asarray(truncated(model, "conv5_block3_out")(x, training=False))
    variables = pretrained.load_keras_resnet50(model)
    var = np.asarray(variables["batch_stats"]["conv2_block1"]["2_bn"]["var"])
    assert np.abs(var - 1).max() > 0.2
    got = run(ResNetEncoder(50, keras_style=True), variables, x)
    assert got.shape == expected.shape == (2, SIZE // 32, SIZE // 32, 2048)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_resnet50_weights_h5_round_trip(tmp_path):
    model = keras_resnet50()
    path = tmp_path / "resnet50.weights.h5"
    model.save_weights(path)
    assert_variables_equal(
        pretrained.load_keras_resnet50(str(path)), pretrained.load_keras_resnet50(model)
    )


def test_mobilenet_v2_weight_files_round_trip(tmp_path):
    """Keras 3 .weights.h5, .keras, and legacy no-top HDF5 load; a file with the classifier is refused."""
    from keras.src.legacy.saving import legacy_h5_format

    model = keras_mobilenet_v2(0.5)
    reference = pretrained.load_keras_mobilenet_v2(model, width=0.5)

    model.save_weights(tmp_path / "m.weights.h5")
    model.save(tmp_path / "m.keras")
    # The layout of the ImageNet downloads (..._no_top.h5): layer_names at the file's root.
    with h5py.File(tmp_path / "no_top.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    # A with-classifier model saved as a legacy full model (weights under 'model_weights').
    top = keras.applications.MobileNetV2(
        weights=None, include_top=True, input_shape=(96, 96, 3), alpha=0.5
    )
    for layer in model.layers:
        if layer.weights:
            top.get_layer(layer.name).set_weights(layer.get_weights())
    top.save(tmp_path / "top.h5")

    for name in ["m.weights.h5", "m.keras", "no_top.h5"]:
        loaded = pretrained.load_keras_mobilenet_v2(tmp_path / name, width=0.5)
        assert_variables_equal(loaded, reference)
    # ImageNet init takes the 'no top' files; one with the classifier is named, not guessed at.
    with pytest.raises(pretrained.WeightFileError, match="top.h5.*classifier"):
        pretrained.load_keras_mobilenet_v2(tmp_path / "top.h5", width=0.5)


def test_width_mismatch_names_layer_and_shapes(tmp_path):
    model = keras_mobilenet_v2(0.5)
    with pytest.raises(ValueError, match=r"'Conv1'.*\(3, 3, 3, 16\).*\(3, 3, 3, 32\)"):
        pretrained.load_keras_mobilenet_v2(model, width=1.0)
    model.save_weights(tmp_path / "m.weights.h5")
    with pytest.raises(ValueError, match="m.weights.h5"):
        pretrained.load_keras_mobilenet_v2(tmp_path / "m.weights.h5", width=1.0)


def test_wrong_architecture_names_missing_layer():
    with pytest.raises(ValueError, match="no layer named 'conv1_bn', 'conv1_conv'"):
        pretrained.load_keras_resnet50(keras_mobilenet_v2(0.5))


def test_bias_mismatch_is_reported():
    # A torchvision-style ResNet has no conv biases; the Keras one does.
    with pytest.raises(ValueError, match="conv1_conv.*unexpected \\[params/bias\\]"):
        pretrained.keras_to_variables(keras_resnet50(), ResNetEncoder(50, keras_style=False))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        pretrained.load_keras_resnet50("/nonexistent/nope.h5")


def test_nested_keras_model_is_searched():
    base = keras_mobilenet_v2(0.5)
    inputs = keras.Input((SIZE, SIZE, 3))
    wrapper = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(base(inputs)))
    assert_variables_equal(
        pretrained.load_keras_mobilenet_v2(wrapper, width=0.5),
        pretrained.load_keras_mobilenet_v2(base, width=0.5),
    )


def test_ambiguous_layer_names_are_refused():
    base = keras_mobilenet_v2(0.5)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(3, 1, name="Conv1")(inputs)  # clashes with base's 'Conv1'
    wrapper = keras.Model(inputs, base(x))
    with pytest.raises(ValueError, match="several layers named 'Conv1'"):
        pretrained.load_keras_mobilenet_v2(wrapper, width=0.5)


def test_init_encoder_from_keras_into_fan():
    source = keras_mobilenet_v2(0.5)
    model = mobilefan(num_landmarks=5, decoder_channels=8, width=0.5)
    x = images(2)
    variables = abstract_init(model, x)
    merged = pretrained.init_encoder_from_keras(model, variables, source)

    expected = np.asarray(truncated(source, "block_16_project_BN")(x, training=False))
    encode = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.encoder(x, train=False)))
    np.testing.assert_allclose(np.asarray(encode(merged, x)), expected, rtol=0, atol=ATOL)
    # Everything outside the encoder is untouched.
    for collection in ("params", "batch_stats"):
        for name in ("decoder", "head"):
            if name in variables[collection]:
                assert_variables_equal(merged[collection][name], variables[collection][name])
    assert flat(merged["params"]).keys() == flat(variables["params"]).keys()


def test_init_encoder_rejects_mismatches():
    model = mobilefan(num_landmarks=5, decoder_channels=8, width=1.0)
    variables = abstract_init(model, images(0))
    with pytest.raises(ValueError, match="Conv1"):
        pretrained.init_encoder_from_keras(model, variables, keras_mobilenet_v2(0.5))
    half = pretrained.load_keras_mobilenet_v2(keras_mobilenet_v2(0.5), width=0.5)
    with pytest.raises(ValueError, match=r"encoder/Conv1/kernel: shape \(3, 3, 3, 16\)"):
        pretrained.merge_encoder_variables(variables, half)
    torch_style_teacher = teacher_resnet50(num_landmarks=5, keras_style=False)
    with pytest.raises(ValueError, match="keras_style=True"):
        pretrained.init_encoder_from_keras(torch_style_teacher, {}, keras_resnet50())


def test_teacher_takes_keras_resnet50():
    source = keras_resnet50()
    model = teacher_resnet50(num_landmarks=5)
    variables = abstract_init(model, images(0))
    merged = pretrained.init_encoder_from_keras(model, variables, source)
    assert_variables_equal(
        merged["params"]["encoder"], pretrained.load_keras_resnet50(source)["params"]
    )
    assert_variables_equal(merged["params"]["decoder"], variables["params"]["decoder"])
