"""Tests for fan_jax.heatmaps (coordinates, Gaussian targets, decoding, flip)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fan_jax import geometry as g
from fan_jax import heatmaps as hm


def test_coordinate_maps():
    p = np.array([[0.0, 1.5], [127.5, 255.0]])
    h = np.asarray(hm.to_heatmap_coords(jnp.asarray(p)))
    np.testing.assert_allclose(h, [[-0.375, 0.0], [31.5, 63.375]])
    np.testing.assert_allclose(np.asarray(hm.from_heatmap_coords(jnp.asarray(h))), p, atol=1e-6)
    # Pixel block 4j..4j+3 of the crop is heatmap pixel j: its centre 4j+1.5 maps to j.
    np.testing.assert_allclose(np.asarray(hm.to_heatmap_coords(jnp.array([4 * 7 + 1.5]))), [7.0])


def _render_reference(points, size, sigma):
    b, n_lm, _ = points.shape
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((b, size, size, n_lm))
    for i in range(b):
        for k in range(n_lm):
            x, y = points[i, k]
            out[i, :, :, k] = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return out


def test_render_matches_reference():
    pts = np.random.default_rng(0).uniform(-3, 20, size=(2, 5, 2)).astype(np.float32)
    out = jax.jit(hm.render_gaussians, static_argnums=(1, 2))(jnp.asarray(pts), 16, 1.5)
    assert out.shape == (2, 16, 16, 5) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), _render_reference(pts, 16, 1.5), atol=1e-6)


def test_render_peak_and_truncation():
    pts = jnp.array([[[5.0, 9.0]]])
    out = np.asarray(hm.render_gaussians(pts, size=16, sigma=1.0, truncate=3.0))
    assert out[0, 9, 5, 0] == 1.0
    assert out[0, 9, 8, 0] > 0 and out[0, 9, 9, 0] == 0  # |dx| = 3 kept, 4 cut
    assert out[0, 12, 5, 0] > 0 and out[0, 13, 5, 0] == 0


@pytest.mark.parametrize("offgrid", [False, True])
def test_render_then_decode_within_quarter_pixel(offgrid):
    rng = np.random.default_rng(1)
    pts = rng.integers(2, 62, size=(3, 20, 2)).astype(np.float32)
    if offgrid:
        pts += rng.uniform(-0.5, 0.5, size=pts.shape).astype(np.float32)
    out = np.asarray(jax.jit(hm.decode)(hm.render_gaussians(jnp.asarray(pts))))
    assert out.shape == (3, 20, 2)
    err = np.abs(out - pts)
    assert err.max() <= (0.25 + 1e-5 if offgrid else 1e-6), err.max()
    if offgrid:
        # The shift must help: from at most 0.5 (plain argmax) to at most 0.25 per axis.
        assert np.mean(err) < np.mean(np.abs(np.round(pts) - pts))


def _decode_reference(heat, simple_baselines):
    """Slow loop over images and landmarks; simple_baselines follows get_final_preds literally."""
    b, h, w, n_lm = heat.shape
    out = np.zeros((b, n_lm, 2))
    for n in range(b):
        for k in range(n_lm):
            m = heat[n, :, :, k]
            idx = int(np.argmax(m))
            px, py = idx % w, idx // w
            x, y = float(px), float(py)
            if simple_baselines:
                if m.max() <= 0:
                    continue  # masked to (0, 0)
                if 1 < px < w - 1 and 1 < py < h - 1:
                    x += 0.25 * np.sign(m[py, px + 1] - m[py, px - 1])
                    y += 0.25 * np.sign(m[py + 1, px] - m[py - 1, px])
            else:
                if 0 < px < w - 1:
                    x += 0.25 * np.sign(m[py, px + 1] - m[py, px - 1])
                if 0 < py < h - 1:
                    y += 0.25 * np.sign(m[py + 1, px] - m[py - 1, px])
            out[n, k] = x, y
    return out


@pytest.mark.parametrize("simple_baselines", [False, True])
def test_decode_matches_loop_reference(simple_baselines):
    rng = np.random.default_rng(2)
    heat = rng.uniform(-1, 1, size=(2, 12, 10, 16)).astype(np.float32)
    # Plant maxima on and next to every border, where the two rules differ.
    spots = [(0, 0), (0, 5), (1, 5), (5, 1), (5, 0), (11, 9), (10, 8), (11, 4), (6, 9), (1, 1)]
    for k, (y, x) in enumerate(spots):
        heat[0, y, x, k] = 5.0
    heat[1, 3, 4, 0] = 5.0
    heat[1, 3, 5, 0] = 5.0  # tie between the argmax and its right neighbour
    heat[1, 3, 3, 0] = 5.0  # three equal in a row: argmax is the first, shift toward the right
    heat[1, :, :, 1] = -rng.uniform(0.1, 1, size=(12, 10))  # all negative: SB masks it
    heat[1, :, :, 2] = 0.0  # flat
    out = np.asarray(jax.jit(hm.decode, static_argnums=1)(jnp.asarray(heat), simple_baselines))
    np.testing.assert_allclose(out, _decode_reference(heat, simple_baselines), atol=0)


def test_decode_border_rules_differ_where_documented():
    heat = np.zeros((1, 8, 8, 1), np.float32)
    heat[0, 4, 1, 0], heat[0, 4, 2, 0] = 1.0, 0.5  # peak at x=1: both neighbours exist
    ours = np.asarray(hm.decode(jnp.asarray(heat)))[0, 0]
    sb = np.asarray(hm.decode(jnp.asarray(heat), simple_baselines=True))[0, 0]
    np.testing.assert_allclose(ours, [1.25, 4.0])
    np.testing.assert_allclose(sb, [1.0, 4.0])


def test_round_trip_through_crop_coordinates():
    rng = np.random.default_rng(3)
    pts = rng.uniform(60, 140, size=(4, 10, 2))
    ms = np.stack(
        [
            g.crop_transform(g.box_from_landmarks(p), 256, rotation_deg=a, flip=f)
            for p, a, f in zip(pts, [0, 15, -20, 30], [False, True, False, True])
        ]
    )
    crop = g.apply_affine(ms, pts)

    @jax.jit
    def through_heatmaps(c):
        return hm.from_heatmap_coords(hm.decode(hm.render_gaussians(hm.to_heatmap_coords(c))))

    decoded = np.asarray(through_heatmaps(jnp.asarray(crop, jnp.float32)), np.float64)
    back = g.apply_affine(g.invert_affine(ms), decoded)
    # 0.25 heatmap px per axis = 1 crop px = side/256 original px; sqrt(2) for the diagonal.
    sides = np.abs(np.linalg.det(ms[:, :, :2])) ** -0.5 * 256
    err = np.linalg.norm(back - pts, axis=-1)
    assert np.all(err <= np.sqrt(2) * sides[:, None] / 256 + 1e-3)


def test_flip_heatmaps_matches_rendering_flipped_points():
    rng = np.random.default_rng(4)
    pts = rng.uniform(0, 63, size=(2, 29, 2)).astype(np.float32)
    perm = g.flip_permutation(29)
    flipped = hm.flip_heatmaps(hm.render_gaussians(jnp.asarray(pts)), perm)
    expected = hm.render_gaussians(jnp.asarray(g.flip_landmarks(pts, 64)))
    np.testing.assert_allclose(np.asarray(flipped), np.asarray(expected), atol=1e-5)
    # Flip-test round trip: flip twice is the identity.
    heat = jnp.asarray(rng.normal(size=(1, 8, 8, 29)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(hm.flip_heatmaps(hm.flip_heatmaps(heat, perm), perm)), np.asarray(heat)
    )


def test_decode_with_peaks_gives_each_maps_maximum_and_the_same_coords():
    maps = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 16, 5)).astype(np.float32))
    coords, peaks = jax.jit(hm.decode_with_peaks)(maps)
    np.testing.assert_array_equal(np.asarray(peaks), np.asarray(maps).max(axis=(1, 2)))
    np.testing.assert_array_equal(np.asarray(coords), np.asarray(hm.decode(maps)))
