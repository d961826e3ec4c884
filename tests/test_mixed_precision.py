"""bfloat16 mixed precision (`train.compute_dtype`): bf16 convolutions, float32 everything kept.

Tolerances. bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%); a deep network's
activations accumulate a few such roundings per layer, so a bf16 forward differs from the
float32 one by about 1% of its scale. The tests allow 5% on the heatmap loss over the first
steps of training (the runs drift apart slowly as the updates differ) and 2% on FS losses
from bf16 taps; a wrong cast (a bf16 optimizer update, bf16 BN or Gram sums) misses these by
far, which the last test shows for the Gram sums.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fan_jax import losses, steps
from fan_jax.models import fan

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers

L = 5


def _batches(n, size=64, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lm = rng.uniform(8, size - 8, (batch, L, 2)).astype(np.float32)
        out.append(
            {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), "landmarks": lm}
        )
    return out


def _state(model, size=64, extra=None):
    v = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    tx = optax.adam(1e-3)
    return steps.create_train_state({"student": v["params"]}, {"student": v["batch_stats"]}, tx), tx


def _dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree) if hasattr(x, "dtype")}


def test_bf16_training_tracks_float32_and_keeps_the_state_float32():
    model = fan.mobilefan(L)
    state0, tx = _state(model)
    batches = _batches(6)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        step = jax.jit(
            functools.partial(steps.train_step, model=model, tx=tx, sigma=1.5, compute_dtype=dtype)
        )
        state, curve = state0, []
        for b in batches:
            state, m = step(state, b, jax.random.key(0))
            curve.append(float(m["heatmap"]))
        runs[dtype] = (state, np.asarray(curve))
    f32, bf16 = runs["float32"][1], runs["bfloat16"][1]
    assert np.all(np.isfinite(bf16))
    np.testing.assert_allclose(bf16, f32, rtol=0.05)
    assert not np.array_equal(bf16, f32)  # the bf16 run did compute in bf16
    state = runs["bfloat16"][0]
    for part in (state.params, state.batch_stats, state.opt_state):
        assert _dtypes(part) <= {"float32", "int32"}, _dtypes(part)


def _eqn_dtypes(jaxpr, names=("conv_general_dilated", "dot_general")):
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            out.append(str(eqn.invars[0].aval.dtype))
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None:
                out.extend(_eqn_dtypes(getattr(inner, "jaxpr", inner), names))
    return out


def test_bf16_runs_the_convolutions_and_matmuls_in_bf16():
    model = fan.mobilefan(L)
    state, tx = _state(model)
    batch = _batches(1)[0]
    kinds = {}
    for dtype in ("float32", "bfloat16"):
        step = functools.partial(
            steps.train_step, model=model, tx=tx, sigma=1.5, compute_dtype=dtype
        )
        kinds[dtype] = _eqn_dtypes(jax.make_jaxpr(step)(state, batch, jax.random.key(0)).jaxpr)
    assert kinds["float32"] and set(kinds["float32"]) == {"float32"}
    # All but the depthwise kernel-gradient reductions (float32 accumulation on purpose).
    frac = kinds["bfloat16"].count("bfloat16") / len(kinds["bfloat16"])
    assert frac > 0.8, (frac, len(kinds["bfloat16"]))


def test_bf16_distillation_step_tracks_float32():
    student, teacher = helpers.tiny_fan(L, 8), helpers.tiny_fan(L, 16)
    state, tx = _state(student)
    tv = teacher.init(jax.random.key(1), jnp.zeros((1, 64, 64, 3)), train=False)
    adapters = fan.Adapters(features=fan.teacher_channels(teacher))
    _, taps = student.apply(
        {"params": state.params["student"], "batch_stats": state.batch_stats["student"]},
        jnp.zeros((1, 64, 64, 3)),
    )
    params = dict(state.params, adapters=adapters.init(jax.random.key(2), taps)["params"])
    state = steps.create_train_state(params, state.batch_stats, tx)
    batch = _batches(1)[0]
    out = {}
    for dtype in ("float32", "bfloat16"):
        step = jax.jit(
            functools.partial(
                steps.distill_step,
                model=student,
                adapters=adapters,
                teacher=teacher,
                tx=tx,
                lam=0.5,
                compute_dtype=dtype,
            )
        )
        new_state, m = step(state, tv, batch, jax.random.key(0))
        out[dtype] = {k: float(v) for k, v in m.items()}
        assert _dtypes(new_state.params) == {"float32"}
    for k, v in out["float32"].items():
        np.testing.assert_allclose(out["bfloat16"][k], v, rtol=0.05, err_msg=k)


@pytest.mark.parametrize("hw,cs,ct", [(16, 128, 256), (32, 64, 256)])
def test_fs_loss_from_bf16_taps_is_within_2_percent(hw, cs, ct):
    rng = np.random.default_rng(0)
    # Post-ReLU taps whose positions share a common direction, as trained features do: the
    # cosines are far from 0, so the Gram form's three terms cancel heavily.
    common_s, common_t = rng.normal(size=cs), rng.normal(size=ct)
    s = np.maximum(rng.normal(size=(2, hw, hw, cs)) + 2 * np.abs(common_s), 0).astype(np.float32)
    t = np.maximum(rng.normal(size=(2, hw, hw, ct)) + 2 * np.abs(common_t), 0).astype(np.float32)
    want = float(losses.feature_similarity_direct(s, t))
    sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    gram = float(losses.feature_similarity_gram(sb, tb))
    direct = float(losses.feature_similarity_direct(sb, tb))
    np.testing.assert_allclose(gram, want, rtol=0.02)
    # The Gram form equals the N x N form on the same bf16 inputs (float32 sums inside).
    np.testing.assert_allclose(gram, direct, rtol=1e-3)


def test_gram_sums_in_bf16_would_lose_the_answer():
    """Why the Gram sums stay float32: accumulated in bf16 they are off by far more than 2%."""
    rng = np.random.default_rng(0)
    hw, cs, ct = 16, 128, 256
    s = np.maximum(rng.normal(size=(1, hw, hw, cs)) + 2 * np.abs(rng.normal(size=cs)), 0)
    t = np.maximum(rng.normal(size=(1, hw, hw, ct)) + 2 * np.abs(rng.normal(size=ct)), 0)
    want = float(losses.feature_similarity_direct(s.astype(np.float32), t.astype(np.float32)))

    def unit_rows(x):
        x = x.reshape(hw * hw, -1)
        return jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), jnp.bfloat16)

    S, T = unit_rows(s), unit_rows(t)

    def sq_gram(a, b):
        g = jnp.dot(a.T, b, preferred_element_type=jnp.bfloat16)
        return jnp.sum(jnp.square(g), dtype=jnp.bfloat16).astype(jnp.float32)

    bf16 = float((sq_gram(S, S) + sq_gram(T, T) - 2 * sq_gram(S, T)) / (hw * hw) ** 2)
    assert abs(bf16 - want) > 0.1 * abs(want), (bf16, want)


def test_unknown_compute_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="train.compute_dtype must be one of"):
        steps.dtype_of("float16")
