"""Tests for fan_jax.steps: losses and updates against slow references, a frozen teacher,
flip-test, any input size, and 4 devices == 1 device.

A tiny encoder (tests/_train_helpers.py) with the real decoder and head keeps compilation
to seconds; the steps never look inside the model.
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fan_jax import heatmaps, landmarks, losses, steps
from fan_jax.models import fan

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers

L = 5  # landmarks


def _batch(size, n=2, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "landmarks": rng.uniform(0, size - 1, (n, L, 2)).astype(np.float32),
    }


def _targets_reference(landmarks, image_size, sigma):
    """Loops over pixels: Gaussian of heatmap pixel centres around (p + 0.5) / 4 - 0.5."""
    h = image_size // 4
    out = np.zeros((len(landmarks), h, h, landmarks.shape[1]), np.float64)
    for b, pts in enumerate(np.asarray(landmarks, np.float64)):
        for k, (px, py) in enumerate(pts):
            cx, cy = (px + 0.5) / 4 - 0.5, (py + 0.5) / 4 - 0.5
            for i in range(h):
                for j in range(h):
                    out[b, i, j, k] = np.exp(-((j - cx) ** 2 + (i - cy) ** 2) / (2 * sigma**2))
    return out


def _init(model, size, seed=0):
    v = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)), train=False)
    return v["params"], v["batch_stats"]


F32_EPS = float(np.finfo(np.float32).eps)


def summed_tolerance(reference, n_terms: int, safety: float = 16.0) -> float:
    """Absolute tolerance for float32 values that are sums of `n_terms` products (a gradient
    sums over batch x pixels): reduction order, which XLA's CPU code generation picks per
    processor, moves a sum by about eps * sqrt(n) * its scale (random-walk rounding)."""
    scale = float(np.max(np.abs(np.asarray(reference)))) if np.size(reference) else 0.0
    return safety * F32_EPS * np.sqrt(n_terms) * scale + np.finfo(np.float32).tiny


@pytest.mark.parametrize("size", [64, 96])
def test_train_step_matches_reference(size):
    model = helpers.tiny_fan(L)
    params, bs = _init(model, size)
    # SGD with momentum: the update is linear in the gradient, so a rounding difference in
    # the gradient stays a rounding difference. (Adam's first step, g / (|g| + eps), turns a
    # 1e-12 change in a gradient near eps into a 1e-4 change in the update: the comparison
    # failed on Intel Xeons for that reason, not for a wrong step.)
    lr = 0.5
    tx = optax.sgd(lr, momentum=0.9)
    state = steps.create_train_state({"student": params}, {"student": bs}, tx)
    batch = _batch(size)
    sigma = 1.5
    new_state, metrics = jax.jit(
        functools.partial(steps.train_step, model=model, tx=tx, sigma=sigma)
    )(state, batch, jax.random.key(0))

    images = jnp.asarray(landmarks.normalize_np(batch["image"]))
    target = jnp.asarray(_targets_reference(batch["landmarks"], size, sigma), jnp.float32)

    def ref_loss(p):
        (hm, _), _ = model.apply(
            {"params": p, "batch_stats": bs}, images, train=True, mutable=["batch_stats"]
        )
        return jnp.mean((hm - target) ** 2)

    loss, grads = jax.value_and_grad(ref_loss)(params)
    # The loss is a mean of B x H x W x L squares; each gradient sums over B x pixels.
    n_loss = target.size
    n_grad = len(images) * size * size
    np.testing.assert_allclose(metrics["loss"], loss, rtol=0, atol=summed_tolerance(loss, n_loss))
    np.testing.assert_allclose(
        metrics["heatmap"], loss, rtol=0, atol=summed_tolerance(loss, n_loss)
    )
    # Recover the step's gradient from its update and its momentum trace; compare each leaf
    # at the scale of that leaf's gradient.
    step_grads = jax.tree.map(
        lambda new, old: (old - new) / lr, new_state.params["student"], params
    )
    trace = new_state.opt_state[0].trace["student"]
    flat_ref = jax.tree_util.tree_leaves_with_path(grads)
    for (path, g), g_step, g_trace, p in zip(
        flat_ref, jax.tree.leaves(step_grads), jax.tree.leaves(trace), jax.tree.leaves(params)
    ):
        name = jax.tree_util.keystr(path)
        tol = summed_tolerance(g, n_grad)
        np.testing.assert_allclose(g_trace, g, rtol=0, atol=tol, err_msg=name)
        # (old - new) / lr also carries the rounding of the parameter subtraction.
        sub = 2 * F32_EPS * float(np.max(np.abs(p))) / lr
        np.testing.assert_allclose(g_step, g, rtol=0, atol=tol + sub, err_msg=name)
    # The gradient is not trivially small: the tolerances above are far below it.
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads)) > 1e3 * max(
        summed_tolerance(g, n_grad) for g in jax.tree.leaves(grads)
    )
    assert int(new_state.step) == 1
    # Train-mode BN moved the running statistics.
    mean_before = bs["encoder"]["BatchNorm_0"]["mean"]
    assert not np.allclose(
        new_state.batch_stats["student"]["encoder"]["BatchNorm_0"]["mean"], mean_before
    )


def _distill_setup(kind="conv", fa=(True, True, True), fs=(True, True, True), size=64):
    student, teacher = helpers.tiny_fan(L, 8), helpers.tiny_fan(L, 16)
    params, bs = _init(student, size, 0)
    tparams, tbs = _init(teacher, size, 1)
    # Running statistics far from the batch's, so train-mode BN would be visibly different.
    rng = np.random.default_rng(3)
    tbs = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32), tbs)
    teacher_vars = {"params": tparams, "batch_stats": tbs}
    adapters = fan.Adapters(features=fan.teacher_channels(teacher), kind=kind) if any(fa) else None
    p, b = {"student": params}, {"student": bs}
    if adapters is not None:
        _, taps = student.apply(
            {"params": params, "batch_stats": bs}, jnp.zeros((1, size, size, 3))
        )
        av = adapters.init(jax.random.key(2), taps)
        p["adapters"] = av["params"]
        if "batch_stats" in av:
            b["adapters"] = av["batch_stats"]
    tx = optax.adam(1e-3)
    state = steps.create_train_state(p, b, tx)
    step = functools.partial(
        steps.distill_step,
        model=student,
        adapters=adapters,
        teacher=teacher,
        tx=tx,
        lam=0.5,
        fa_layers=fa,
        fs_layers=fs,
    )
    return student, teacher, adapters, teacher_vars, state, step


def test_distill_step_terms_and_frozen_teacher():
    student, teacher, adapters, tv, state, step = _distill_setup()
    batch = _batch(64)
    new_state, m = jax.jit(step)(state, tv, batch, jax.random.key(0))
    assert set(m) == {"loss", "heatmap", "fa1", "fa2", "fa3", "fs1", "fs2", "fs3"}
    terms = sum(m[k] for k in ("fa1", "fa2", "fa3", "fs1", "fs2", "fs3"))
    np.testing.assert_allclose(m["loss"], m["heatmap"] + 0.5 * terms, rtol=1e-6)

    # Reference terms: teacher in inference mode (running statistics), student in train mode.
    images = jnp.asarray(landmarks.normalize_np(batch["image"]))
    _, t_taps = teacher.apply(tv, images, train=False)
    (_, s_taps), _ = student.apply(
        {"params": state.params["student"], "batch_stats": state.batch_stats["student"]},
        images,
        train=True,
        mutable=["batch_stats"],
    )
    adapted = adapters.apply({"params": state.params["adapters"]}, s_taps)
    ref = losses.distillation_terms(s_taps, adapted, t_taps)
    for k, v in ref.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, err_msg=k)
    _, t_taps_train = teacher.apply(tv, images, train=True, mutable=["batch_stats"])[0]
    assert not np.allclose(
        losses.distillation_terms(s_taps, adapted, t_taps_train)["fa1"], m["fa1"]
    )

    # The teacher is an input, not a parameter: no gradient reaches it, and the state has
    # only the student and its adapters.
    grad_t = jax.grad(lambda t: step(state, t, batch, jax.random.key(0))[1]["loss"])(tv)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grad_t))
    assert set(new_state.params) == {"student", "adapters"}
    assert jax.tree.structure(new_state.opt_state) == jax.tree.structure(state.opt_state)


def test_distill_ablation_subsets_and_bn_adapters():
    # FS only: no adapters at all.
    _, _, adapters, tv, state, step = _distill_setup(
        fa=(False, False, False), fs=(False, True, False)
    )
    assert adapters is None and set(state.params) == {"student"}
    _, m = jax.jit(step)(state, tv, _batch(64), jax.random.key(0))
    assert set(m) == {"loss", "heatmap", "fs2"}
    # One FA term with the public code's conv-BN-ReLU adapters: their BN statistics move.
    _, _, _, tv, state, step = _distill_setup(
        "conv_bn_relu", fa=(True, False, False), fs=(False, False, True)
    )
    new_state, m = jax.jit(step)(state, tv, _batch(64), jax.random.key(0))
    assert set(m) == {"loss", "heatmap", "fa1", "fs3"}
    before = state.batch_stats["adapters"]["adapter_0_bn"]["mean"]
    assert not np.allclose(new_state.batch_stats["adapters"]["adapter_0_bn"]["mean"], before)


def test_landmarks_flip_test_matches_host_reference():
    model = helpers.tiny_fan(L)
    params, bs = _init(model, 64)
    variables = {"params": params, "batch_stats": bs}
    images = _batch(64, n=3)["image"]
    perm = np.array([1, 0, 2, 4, 3])
    pred, scores = landmarks.landmarks("heatmap", model, variables, images, perm)
    plain, _ = landmarks.landmarks("heatmap", model, variables, images)
    both = landmarks.landmarks_with_flip("heatmap", model, variables, images, perm)
    # Reference on host: mirror the image, mirror the heatmaps back, swap channels, average.
    x = jnp.asarray(landmarks.normalize_np(images))
    hm = np.asarray(model.apply(variables, x)[0])
    hm_m = np.asarray(model.apply(variables, x[:, :, ::-1])[0])[:, :, ::-1][..., perm]
    avg = 0.5 * (hm + hm_m)
    expected = heatmaps.from_heatmap_coords(heatmaps.decode(jnp.asarray(avg)), stride=4)
    np.testing.assert_allclose(pred, expected, atol=1e-5)
    np.testing.assert_allclose(scores, avg.max(axis=(1, 2)), atol=1e-6)
    assert not np.allclose(pred, plain)  # the mirror pass changed something
    assert pred.shape == plain.shape == (3, L, 2)
    # Evaluation's pair comes from the same two passes.
    np.testing.assert_allclose(both[0], plain, atol=1e-6)
    np.testing.assert_allclose(both[1], pred, atol=1e-6)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import functools, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, {tests!r})
    import _train_helpers as helpers
    from fan_jax import steps
    from fan_jax.models import fan

    assert jax.device_count() == 4, jax.devices()
    L = 5
    rng = np.random.default_rng(0)
    batch = {{"image": rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8),
              "landmarks": rng.uniform(0, 63, (8, L, 2)).astype(np.float32)}}
    student, teacher = helpers.tiny_fan(L, 8), helpers.tiny_fan(L, 16)
    x = jnp.zeros((1, 64, 64, 3))
    sv = student.init(jax.random.key(0), x)
    tv = teacher.init(jax.random.key(1), x)
    adapters = fan.Adapters(features=(16, 16, 16))
    av = adapters.init(jax.random.key(2), student.apply(sv, x)[1])
    # SGD: linear in the gradient, so 4-device and 1-device sums that differ in rounding
    # give updates that differ in rounding (Adam's g / (|g| + eps) amplifies it near eps).
    tx = optax.sgd(1e-2, momentum=0.9)
    kinds = {{
        "plain": (functools.partial(steps.train_step, model=student, tx=tx),
                  steps.create_train_state({{"student": sv["params"]}},
                                           {{"student": sv["batch_stats"]}}, tx), None),
        "distill": (functools.partial(steps.distill_step, model=student, adapters=adapters,
                                      teacher=teacher, tx=tx, lam=1.0),
                    steps.create_train_state({{"student": sv["params"], "adapters": av["params"]}},
                                             {{"student": sv["batch_stats"]}}, tx), tv),
    }}
    for name, (fn, state, teacher_vars) in kinds.items():
        out = {{}}
        for n in (4, 1):
            mesh = Mesh(np.asarray(jax.devices()[:n]), ("batch",))
            repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
            s = jax.device_put(state, repl)
            b = {{k: jax.make_array_from_process_local_data(data, v) for k, v in batch.items()}}
            assert len(b["image"].sharding.device_set) == n
            if teacher_vars is None:
                f = jax.jit(fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl))
                s, m = f(s, b, jax.random.key(0))
            else:
                f = jax.jit(fn, in_shardings=(repl, repl, data, repl), out_shardings=(repl, repl))
                s, m = f(s, jax.device_put(teacher_vars, repl), b, jax.random.key(0))
            out[n] = (jax.device_get(m), jax.device_get(s))
        (m4, s4), (m1, s1) = out[4], out[1]
        for k in m1:
            np.testing.assert_allclose(m4[k], m1[k], rtol=2e-5, err_msg=name + k)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     (s4.params, s4.batch_stats), (s1.params, s1.batch_stats))
        print(name, "OK", {{k: float(v) for k, v in m1.items()}})
""")


def test_four_devices_match_one_device():
    """Same global batch on a 4-device mesh and a 1-device mesh: same loss, same update."""
    script = MULTI_DEVICE_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "plain OK" in r.stdout and "distill OK" in r.stdout
