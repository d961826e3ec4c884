"""ASM soft-landmark fitter: span, variance rule, clipping, determinism, storage."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fan_jax import asm

L = 12


def random_shapes(n: int, seed: int = 0, modes: int | None = None) -> np.ndarray:
    """Mean face + anisotropic noise (decaying variances), optionally of limited rank."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.8, (L, 2))
    d = 2 * L if modes is None else modes
    basis = np.linalg.qr(rng.normal(size=(2 * L, d)))[0].T  # d orthonormal directions
    scales = 0.1 * 0.7 ** np.arange(d)
    coeff = rng.normal(size=(n, d)) * scales
    return base + (coeff @ basis).reshape(n, L, 2)


def test_full_variance_reconstructs_training_shapes():
    # With N = 10 no training coefficient can exceed 3 sigma (|b| <= (N-1)/sqrt(N) sigma),
    # so clipping is inactive and 100% must give back every shape.
    shapes = random_shapes(10)
    model = asm.fit(shapes, variance_percent=100)
    assert model.num_modes == 9  # rank of 10 centred shapes
    np.testing.assert_allclose(model.project(shapes), shapes, atol=1e-12)


def test_full_variance_without_clip_many_shapes():
    shapes = random_shapes(200, seed=1)
    model = asm.fit(shapes, 100)
    assert model.num_modes == 2 * L
    np.testing.assert_allclose(model.project(shapes, clip=False), shapes, atol=1e-12)


def test_shape_in_span_is_unchanged():
    shapes = random_shapes(300, seed=2)
    model = asm.fit(shapes, 97)
    assert 0 < model.num_modes < 2 * L
    b = 0.5 * model.limits * np.linspace(-1, 1, model.num_modes)
    inside = model.reconstruct(b)
    np.testing.assert_allclose(model.project(inside), inside, atol=1e-12)
    np.testing.assert_allclose(model.coefficients(inside), b, atol=1e-12)
    # A generic training shape is not in the span of 97%: it moves.
    assert np.abs(model.project(shapes[0]) - shapes[0]).max() > 1e-6


def test_coefficients_are_clipped():
    model = asm.fit(random_shapes(300, seed=3), 97)
    far = model.reconstruct(np.eye(model.num_modes)[0] * 10 * model.limits[0] / 3)
    b = model.coefficients(far)
    assert b[0] == pytest.approx(model.limits[0])
    np.testing.assert_allclose(b[1:], 0, atol=1e-12)
    np.testing.assert_allclose(
        model.project(far),
        model.reconstruct(np.eye(model.num_modes)[0] * model.limits[0]),
        atol=1e-12,
    )
    assert np.all(np.abs(model.coefficients(far * -3)) <= model.limits + 1e-12)
    np.testing.assert_allclose(model.limits, 3 * np.sqrt(model.eigenvalues))


def test_variance_rule_counts_modes():
    # Exact variances 8, 4, 2, 1, 1 (sum 16): cumulative 0.5, 0.75, 0.875, 0.9375, 1.
    rng = np.random.default_rng(4)
    n = 1000
    z = rng.normal(size=(n, 5))
    z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T))).T  # whiten exactly
    z *= np.sqrt([8, 4, 2, 1, 1])
    basis = np.linalg.qr(rng.normal(size=(2 * L, 5)))[0].T
    shapes = (0.5 + z @ basis).reshape(n, L, 2)
    counts = {p: asm.fit(shapes, p).num_modes for p in (40, 49, 51, 74, 76, 80, 90, 97, 100)}
    # sklearn's rule: the first cumulative ratio above the target (targets off the exact
    # cumulative values, where float rounding decides).
    assert counts == {40: 1, 49: 1, 51: 2, 74: 2, 76: 3, 80: 3, 90: 4, 97: 5, 100: 5}
    np.testing.assert_allclose(asm.fit(shapes, 100).eigenvalues, [8, 4, 2, 1, 1], rtol=1e-9)


def test_matches_naive_pca():
    shapes = random_shapes(50, seed=5)
    model = asm.fit(shapes, 100)
    x = shapes.reshape(50, -1)
    _u, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(model.eigenvalues, (s**2 / 49)[: model.num_modes], rtol=1e-9)
    # Same subspaces mode by mode (up to sign).
    np.testing.assert_allclose(
        np.abs(np.sum(model.components * vt[: model.num_modes], 1)), 1, atol=1e-8
    )


def test_deterministic():
    shapes = random_shapes(100, seed=6)
    a, b = asm.fit(shapes, 97), asm.fit(shapes.copy(), 97)
    np.testing.assert_array_equal(a.components, b.components)
    np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    # Order of the training shapes does not flip any sign.
    c = asm.fit(shapes[::-1], 97)
    np.testing.assert_allclose(c.components, a.components, atol=1e-9)
    for row in a.components:
        assert row[np.argmax(np.abs(row))] > 0


def test_save_load_round_trip(tmp_path):
    model = asm.fit(random_shapes(40, seed=7), 90, clip_sigmas=2.5)
    path = tmp_path / "asm.npz"
    model.save(path)
    back = asm.ShapeModel.load(path)
    for f in ("mean", "components", "eigenvalues"):
        np.testing.assert_array_equal(getattr(back, f), getattr(model, f))
    assert back.variance_percent == 90 and back.clip_sigmas == 2.5
    x = random_shapes(3, seed=8)
    np.testing.assert_array_equal(back.project(x), model.project(x))


def test_project_jnp_matches_numpy():
    model = asm.fit(random_shapes(60, seed=9), 97)
    x = random_shapes(4, seed=10).astype(np.float32) * 1.5  # some coefficients clip
    got = jax.jit(model.project_jnp)(x)
    np.testing.assert_allclose(np.asarray(got), model.project(x), atol=1e-5)
    assert got.shape == x.shape and got.dtype == np.float32


def test_bad_inputs():
    with pytest.raises(ValueError, match="variance_percent"):
        asm.fit(random_shapes(5), 0)
    with pytest.raises(ValueError, match="identical"):
        asm.fit(np.ones((4, L, 2)), 97)
    with pytest.raises(ValueError, match="expected"):
        asm.fit(random_shapes(5), 97).project(np.zeros((3, L + 1, 2)))
