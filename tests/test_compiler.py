"""fan_jax.compiler: per-role XLA options, and that the inference paths compile with them."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from fan_jax import compiler, evaluate, landmarks
from fan_jax.models import fan

YNN = "xla_cpu_experimental_ynn_fusion_type"


def test_roles_and_backends(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("FAN_JAX_COMPILER_DEFAULTS", raising=False)
    assert compiler.compiler_options("predict", "cpu") == {YNN: ""}
    assert compiler.compiler_options("train", "cpu") is None
    assert compiler.compiler_options("predict", "gpu") is None
    with pytest.raises(ValueError, match="compiler role"):
        compiler.compiler_options("eval", "cpu")


def test_user_settings_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{YNN}=dot")
    assert compiler.compiler_options("predict", "cpu") is None
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("FAN_JAX_COMPILER_DEFAULTS", "0")
    assert compiler.compiler_options("predict", "cpu") is None


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU choice")
def test_evaluator_compiles_with_the_predict_options_and_agrees(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    model = fan.mobilefan(num_landmarks=5, decoder_channels=16, width=0.35)
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), images.astype(np.float32)
    )
    ev = evaluate.Evaluator("heatmap", model)
    ours = ev._fn.lower(variables, images).compile()
    plain_fn = jax.jit(
        functools.partial(landmarks.landmarks_with_flip, "heatmap", model, flip_perm=None)
    )
    plain = plain_fn.lower(variables, images).compile()
    # XLA's default sends the 1x1-conv matmuls to YNNPACK; the predict role turns that off.
    assert "__ynn_fusion" in plain.as_text()
    assert "__ynn_fusion" not in ours.as_text()
    got, want = ev(variables)(images)[0], plain(variables, images)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
