"""Regression models: the student's full MobileNetV2 stack against Keras, the head, the registry."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fan_jax.models import regression as reg

SIZE = 64
L = 5


def _randomize(model, seed):
    import keras

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
                depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
                fan_in = np.prod(shape[:2]) * (1 if depthwise else shape[2])
                new.append(rng.normal(0.0, np.sqrt(1.0 / fan_in), shape))
            layer.set_weights(new)
    return model


@functools.cache
def keras_mobilenet_v2():
    import keras

    model = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(SIZE, SIZE, 3), alpha=1.0
    )
    return _randomize(model, seed=11)


def test_student_encoder_matches_keras_full_stack():
    student = reg.build_regressor("mobilenet_v2_reg", L)
    x = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    variables = jax.jit(lambda a: student.init(jax.random.key(0), a, train=False))(x)
    variables = reg.init_encoder_from_keras(student, variables, keras_mobilenet_v2())
    want = np.asarray(keras_mobilenet_v2()(x, training=False))  # Keras 'out_relu'
    enc_vars = {k: v["encoder"] for k, v in variables.items()}
    got = jax.jit(lambda v, a: student.encoder.apply(v, a, train=False))(enc_vars, x)
    assert got.shape == want.shape == (2, 2, 2, 1280)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    # The head consumes exactly those features.
    out = jax.jit(lambda v, a: student.apply(v, a, train=False))(variables, x)
    w = np.asarray(variables["params"]["head"]["out"]["kernel"])
    b = np.asarray(variables["params"]["head"]["out"]["bias"])
    np.testing.assert_allclose(
        np.asarray(out), (want.mean((1, 2)) @ w + b).reshape(2, L, 2), atol=1e-4
    )


def test_head_layout_and_dropout():
    head = reg.RegressionHead(L, dropout_rate=0.5)
    f = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 4, 8)), jnp.float32)
    v = head.init(jax.random.key(0), f, train=False)
    w, b = v["params"]["out"]["kernel"], v["params"]["out"]["bias"]
    np.testing.assert_array_equal(b, np.full(2 * L, 0.5, np.float32))
    out = head.apply(v, f, train=False)
    flat = np.asarray(f).mean((1, 2)) @ np.asarray(w) + np.asarray(b)
    # (x0, y0, x1, y1, ...) -> [B, L, 2]
    np.testing.assert_allclose(np.asarray(out)[:, 1, 0], flat[:, 2], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out)[:, 1, 1], flat[:, 3], rtol=1e-5)
    t1 = head.apply(v, f, train=True, rngs={"dropout": jax.random.key(1)})
    t2 = head.apply(v, f, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(t1, t2) and not np.allclose(t1, out)


def test_registry_and_shapes():
    x = jnp.zeros((1, SIZE, SIZE, 3))
    for name, channels in (("mobilenet_v2_reg", 1280), ("efficientnet_b3_reg", 1536)):
        model = reg.build_regressor(name, L)
        shapes = jax.eval_shape(lambda model=model: model.init(jax.random.key(0), x, train=False))
        out = jax.eval_shape(lambda v, model=model: model.apply(v, x, train=False), shapes)
        assert out.shape == (1, L, 2)
        assert shapes["params"]["head"]["out"]["kernel"].shape == (channels, 2 * L)
    teacher = reg.build_regressor("efficientnet_b3_reg", L)
    assert teacher.head.dropout_rate == 0.5
    assert teacher.encoder.input_scale is not None
    with pytest.raises(ValueError, match="unknown regression model"):
        reg.build_regressor("resnet", L)


def test_student_train_mode_collections():
    """Train mode needs a dropout rng and updates every BN's statistics (traced only)."""
    student = reg.build_regressor("mobilenet_v2_reg", L)
    x = jnp.zeros((2, 32, 32, 3), jnp.float32)
    v = jax.eval_shape(lambda: student.init(jax.random.key(0), x, train=False))
    out, new = jax.eval_shape(
        lambda v: student.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)}
        ),
        v,
    )
    assert out.shape == (2, L, 2)
    assert jax.tree.structure(new["batch_stats"]) == jax.tree.structure(v["batch_stats"])
    assert "Conv_1_bn" in new["batch_stats"]["encoder"]
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v: student.apply(v, x, train=True, mutable=["batch_stats"]), v)
