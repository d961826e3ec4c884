"""KD-Loss terms: hand-computed regions, continuity, gradients, and the public code's formula."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from fan_jax import kd_loss as kd

# Dyadic numbers so region boundaries are exact in float32.
A, AN, BETA = 2.0, -0.5, 0.25


def f32(*xs):
    return jnp.asarray(xs, jnp.float32)


def public_code_aloss(p, g, t, alpha, alpha_neg, beta):
    """The authors' sign-product formulation (custom_Losses.kd_loss), in numpy."""
    t_r = g + np.sign(p - g) * np.abs(t - g)
    b = g + np.sign(p - g) * np.abs(t_r - g) * beta
    pos = np.where(np.sign(p - t_r) * np.sign(t_r - g) > 0, alpha, 0.0)
    neg = np.where(np.sign(t_r - p) * np.sign(p - b) >= 0, alpha_neg, 0.0)
    return np.mean((pos + neg) * np.abs(t_r - p))


def public_code_main(p, g, tol, c=3.0):
    e, tau = np.abs(g - p), np.abs(g - tol)
    return np.mean(np.where(e > tau, e**2 + c * tau - tau**2, 0.0)) + np.mean(
        np.where(e <= tau, c * e, 0.0)
    )


class AssistiveLossTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        # (g, T, p, expected weight, expected |T' - p|)
        ("beyond_teacher", 0.0, 0.5, 0.75, A, 0.25),
        ("beyond_teacher_reflected", 0.0, 0.5, -0.75, A, 0.25),
        ("beyond_teacher_other_side", 1.0, 0.5, 1.75, A, 0.25),
        ("between", 0.0, 0.5, 0.25, AN, 0.25),
        ("between_reflected_teacher", 0.0, -0.5, 0.25, AN, 0.25),
        ("at_reflected_teacher", 0.0, 0.5, 0.5, AN, 0.0),
        ("at_b_inclusive", 0.0, 0.5, 0.125, AN, 0.375),
        ("inside_b", 0.0, 0.5, 0.0625, 0.0, 0.4375),
        ("inside_b_negative", 0.0, 0.5, -0.0625, 0.0, 0.4375),
        ("at_ground_truth", 0.0, 0.5, 0.0, 0.0, 0.0),
        ("teacher_exact", 0.0, 0.0, 0.25, A, 0.25),
        ("teacher_exact_at_gt", 0.0, 0.0, 0.0, AN, 0.0),  # B == T' == g == p: inclusive
    )
    def test_regions(self, g, t, p, weight, dist):
        w = self.variant(kd.assistive_weights, static_argnums=(3, 4, 5))(
            f32(p), f32(g), f32(t), A, AN, BETA
        )
        loss = self.variant(kd.assistive_loss, static_argnums=(3, 4, 5))(
            f32(p), f32(g), f32(t), A, AN, BETA
        )
        chex.assert_trees_all_close(w, f32(weight))
        chex.assert_trees_all_close(loss, jnp.float32(weight * dist), atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mean_over_elements(self):
        p, g, t = f32(0.75, 0.25, 0.0625), f32(0.0, 0.0, 0.0), f32(0.5, 0.5, 0.5)
        loss = self.variant(kd.assistive_loss, static_argnums=(3, 4, 5))(p, g, t, A, AN, BETA)
        chex.assert_trees_all_close(loss, jnp.float32((A * 0.25 + AN * 0.25 + 0.0) / 3))

    def test_matches_public_code_formula(self):
        rng = np.random.default_rng(0)
        p, g, t = (rng.normal(size=(4, 98, 2)).astype(np.float32) for _ in range(3))
        for alpha, alpha_neg, beta in ((1.9, -0.45, 0.15), (1.8, -0.4, 0.15), (1.0, -0.5, 0.4)):
            want = public_code_aloss(p, g, t, alpha, alpha_neg, beta)
            got = kd.assistive_loss(
                jnp.asarray(p), jnp.asarray(g), jnp.asarray(t), alpha, alpha_neg, beta
            )
            np.testing.assert_allclose(got, want, rtol=1e-5)

    def test_gradient_pulls_towards_ground_truth(self):
        g, t = f32(0.0), f32(0.5)
        grad = jax.grad(lambda p: kd.assistive_loss(p, g, t, A, AN, BETA).sum())
        assert grad(f32(0.75))[0] == pytest.approx(A)  # beyond T': descent lowers p
        assert grad(f32(-0.75))[0] == pytest.approx(-A)  # mirrored
        assert grad(f32(0.25))[0] == pytest.approx(-AN)  # negative weight: away from T'
        assert grad(f32(0.0625))[0] == 0.0


class MainLossTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("linear", 0.25, 0.75),  # 3 e
        ("quadratic", 1.0, 2.25),  # e^2 + 3 tau - tau^2 = 1 + 1.5 - 0.25
        ("at_switch", 0.5, 1.5),  # both branches: 3 tau
        ("zero", 0.0, 0.0),
    )
    def test_branches(self, e, want):
        g, tol = f32(1.0), f32(1.5)  # tau = 0.5
        for p in (1.0 + e, 1.0 - e):
            got = self.variant(kd.main_loss)(f32(p), g, tol)
            chex.assert_trees_all_close(got, jnp.float32(want))

    def test_continuous_at_switch(self):
        for tau in (0.5, 0.03, 2.0):
            for c in (3.0, 1.0):
                g, tol = f32(0.0), f32(tau)
                below = kd.main_loss(f32(tau * (1 - 1e-4)), g, tol, c)
                above = kd.main_loss(f32(tau * (1 + 1e-4)), g, tol, c)
                at = kd.main_loss(f32(tau), g, tol, c)
                np.testing.assert_allclose(at, c * tau, rtol=1e-6)
                np.testing.assert_allclose(below, at, rtol=1e-3)
                np.testing.assert_allclose(above, at, rtol=1e-3)

    def test_matches_public_code_formula(self):
        rng = np.random.default_rng(1)
        p, g, t = (rng.uniform(size=(3, 68, 2)).astype(np.float32) for _ in range(3))
        np.testing.assert_allclose(kd.main_loss(p, g, t), public_code_main(p, g, t), rtol=1e-5)


class TotalLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_total_is_weighted_sum(self):
        rng = np.random.default_rng(2)
        p, g, tough, tol = (jnp.asarray(rng.uniform(size=(2, 5, 2)), jnp.float32) for _ in range(4))
        cfg = kd.KDLossConfig()
        total, terms = self.variant(kd.kd_loss, static_argnums=4)(p, g, tough, tol, cfg)
        chex.assert_trees_all_close(terms["main"], 2.0 * kd.main_loss(p, g, tol, 3.0))
        chex.assert_trees_all_close(
            terms["tough"], kd.assistive_loss(p, g, tough, 1.9, -0.45, 0.15)
        )
        chex.assert_trees_all_close(
            terms["tolerant"], kd.assistive_loss(p, g, tol, 1.8, -0.4, 0.15)
        )
        chex.assert_trees_all_close(total, terms["main"] + terms["tough"] + terms["tolerant"])

    def test_config_from_mapping(self):
        cfg = kd.KDLossConfig.from_mapping({"alpha_tough": 1, "main_linear_factor": 1.0, "x": 3})
        assert cfg.alpha_tough == 1.0 and cfg.main_linear_factor == 1.0
        assert cfg.alpha_tolerant == 1.8

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_finite_everywhere(self):
        # Every special point at once: p == g, T == g, p == T', p == B, e == tau.
        g = jnp.zeros((8,), jnp.float32)
        p = f32(0.0, 0.25, 0.5, 0.125, 0.5, -0.5, 1.0, 0.0)
        tough = f32(0.5, 0.0, 0.5, 0.5, -0.5, 0.0, 0.5, 0.0)
        tol = f32(0.0, 0.25, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0)
        cfg = kd.KDLossConfig(beta_tough=0.25, beta_tolerant=0.25)

        def f(p):
            return kd.kd_loss(p, g, tough, tol, cfg)[0]

        val, grad = self.variant(jax.value_and_grad(f))(p)
        chex.assert_tree_all_finite((val, grad))
        # Teachers and ground truth get no gradient.
        grads = jax.grad(lambda g, t1, t2: kd.kd_loss(p, g, t1, t2, cfg)[0], argnums=(0, 1, 2))(
            g, tough, tol
        )
        chex.assert_trees_all_close(grads, tuple(jnp.zeros_like(x) for x in (g, tough, tol)))

    def test_mse(self):
        chex.assert_trees_all_close(kd.mse(f32(1.0, 3.0), f32(0.0, 1.0)), jnp.float32(2.5))
