"""EfficientNet-B3 encoder: parity with keras.applications.EfficientNetB3 and weight import.

The Keras model gets random weights everywhere, including BN moving statistics and its input
Normalization layer, so swapped mean/variance or a wrong preprocessing would fail. 72x72
input: the stride-2 depthwise convs then see both even (36, 18) and odd (9, 5) sizes, where
Keras's correct_pad and 'SAME' could disagree.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import traverse_util

from fan_jax import pretrained_efficientnet as pe
from fan_jax.models import efficientnet as en

SIZE = 72
ATOL = 1e-4


def randomize(model: keras.Model, seed: int) -> keras.Model:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "BatchNormalization":
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(0.0, 0.2, c),
                    rng.normal(0.0, 0.2, c),
                    rng.uniform(0.5, 2.0, c),
                ]
            )
        elif kind == "Normalization":
            layer.set_weights([rng.uniform(0.3, 0.6, 3), rng.uniform(0.03, 0.09, 3), np.asarray(0)])
        elif layer.weights:
            new = []
            for w in layer.weights:
                shape = tuple(w.shape)
                if len(shape) == 4:  # keep activations O(1) through 26 blocks
                    fan_in = np.prod(shape[:2]) * (1 if kind == "DepthwiseConv2D" else shape[2])
                    new.append(rng.normal(0.0, np.sqrt(1.0 / fan_in), shape))
                else:
                    new.append(rng.normal(0.0, 0.1, shape))
            layer.set_weights(new)
    return model


@functools.cache
def keras_b3() -> keras.Model:
    model = keras.applications.EfficientNetB3(
        weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)
    )
    return randomize(model, seed=3)


@functools.cache
def converted():
    return pe.load_keras_efficientnet(keras_b3(), "b3")


def raw_images(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


def test_block_layout_matches_keras():
    names = {layer.name for layer in keras_b3().layers}
    configs = en.block_configs("b3")
    assert len(configs) == 26  # ceil(1.4 * [1, 2, 2, 3, 3, 4, 1])
    for cfg in configs:
        assert f"{cfg['name']}_dwconv" in names
    assert f"block{len(en.BASE_BLOCKS)}c_dwconv" not in names
    assert en.output_channels("b3") == 1536
    assert keras_b3().output.shape[-1] == 1536
    # Every Keras weight but the input Normalization's (mean 3, variance 3, count 1).
    assert sum(np.size(v) for v in jax.tree.leaves(converted())) == keras_b3().count_params() - 7


def test_matches_keras_inference():
    model = keras_b3()
    x = raw_images()
    want = np.asarray(model(x, training=False))
    mean, var = pe.keras_input_normalization(model)
    ours_in = ((x / 255.0 - mean) / np.sqrt(var)).astype(np.float32)
    # Run with input_scale (one compile covers it): the encoder must multiply its input by
    # exactly these factors before the stem.
    scale = np.float32(en.KERAS_IMAGENET_INPUT_SCALE)
    enc = en.EfficientNetEncoder("b3", input_scale=tuple(float(s) for s in scale))
    got = np.asarray(
        jax.jit(lambda v, a: enc.apply(v, a, train=False))(converted(), ours_in / scale)
    )
    assert got.shape == want.shape == (2, 3, 3, 1536)
    assert np.abs(want).max() > 0.1  # a real signal, not a collapsed network
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_conversion_fills_every_variable():
    target = jax.eval_shape(
        lambda: en.EfficientNetEncoder("b3").init(
            jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False
        )
    )
    flat_t = traverse_util.flatten_dict({k: dict(v) for k, v in target.items()})
    flat_c = traverse_util.flatten_dict(converted())
    assert flat_t.keys() == flat_c.keys()
    for k in flat_t:
        assert flat_t[k].shape == flat_c[k].shape, k
    layer = keras_b3().get_layer("block4a_dwconv")
    np.testing.assert_array_equal(
        np.asarray(converted()["params"]["block4a_dwconv"]["kernel"]),
        np.asarray(layer.kernel).transpose(0, 1, 3, 2),
    )
    bn = keras_b3().get_layer("top_bn")
    np.testing.assert_array_equal(
        np.asarray(converted()["batch_stats"]["top_bn"]["var"]), np.asarray(bn.moving_variance)
    )


def test_wrong_variant_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        pe.load_keras_efficientnet(keras_b3(), "b0")


def test_train_mode_updates_stats_and_drops_branches():
    enc = en.EfficientNetEncoder("b0")
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
    v = jax.jit(lambda x: enc.init(jax.random.key(0), x, train=False))(x)
    f = jax.jit(
        lambda v, x, r: enc.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": r})
    )
    y1, s1 = f(v, x, jax.random.key(1))
    y2, _ = f(v, x, jax.random.key(2))
    y1b, _ = f(v, x, jax.random.key(1))
    assert np.all(np.isfinite(y1))
    np.testing.assert_array_equal(y1, y1b)
    assert not np.allclose(y1, y2)  # drop-connect is active in training
    assert not np.allclose(
        s1["batch_stats"]["stem_bn"]["mean"], v["batch_stats"]["stem_bn"]["mean"]
    )


def test_weight_file_round_trip(tmp_path):
    path = str(tmp_path / "b3.weights.h5")
    keras_b3().save_weights(path)
    from_file = pe.load_keras_efficientnet(path, "b3")
    a, b = traverse_util.flatten_dict(from_file), traverse_util.flatten_dict(converted())
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))
