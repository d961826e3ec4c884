"""Tests for fan_jax.geometry (flip permutations, crop affines, warping)."""

import cv2
import numpy as np
import pytest

from fan_jax import geometry as g
from fan_jax import metrics


@pytest.mark.parametrize("num", [68, 98, 29])
def test_flip_permutation_is_involutive_permutation(num):
    p = g.flip_permutation(num)
    assert p.shape == (num,)
    np.testing.assert_array_equal(np.sort(p), np.arange(num))
    np.testing.assert_array_equal(p[p], np.arange(num))


# (a, b) means a <-> b; (a, a) means a stays on the midline. Semantic pairs from the layouts:
# outer/inner eye corners, brow ends, mouth corners, contour ends, nose and lip midline points.
HAND_PAIRS = {
    68: [
        (36, 45),
        (39, 42),
        (0, 16),
        (8, 8),
        (17, 26),
        (27, 27),
        (30, 30),
        (31, 35),
        (33, 33),
        (37, 44),
        (41, 46),
        (48, 54),
        (51, 51),
        (57, 57),
        (60, 64),
        (62, 62),
        (65, 67),
        (66, 66),
    ],
    98: [
        (60, 72),
        (64, 68),
        (96, 97),
        (0, 32),
        (16, 16),
        (33, 46),
        (38, 50),
        (37, 42),
        (51, 51),
        (54, 54),
        (55, 59),
        (57, 57),
        (61, 71),
        (65, 75),
        (76, 82),
        (79, 79),
        (83, 87),
        (85, 85),
        (88, 92),
        (90, 90),
        (93, 95),
        (94, 94),
    ],
    29: [
        (8, 9),
        (0, 1),
        (2, 3),
        (4, 6),
        (5, 7),
        (10, 11),
        (12, 14),
        (13, 15),
        (16, 17),
        (18, 19),
        (20, 20),
        (21, 21),
        (22, 23),
        (24, 24),
        (28, 28),
    ],
}


@pytest.mark.parametrize("num", [68, 98, 29])
def test_flip_permutation_hand_pairs(num):
    p = g.flip_permutation(num)
    for a, b in HAND_PAIRS[num]:
        assert p[a] == b and p[b] == a, (num, a, b, p[a], p[b])


@pytest.mark.parametrize("dataset,num", [("wflw", 98), ("300w", 68), ("cofw", 29)])
def test_flip_swaps_normaliser_points(dataset, num):
    # The eye corners / pupils must trade places under a flip, or the flip is wrong.
    p = g.flip_permutation(num)
    for kind in ("inter_ocular", "inter_pupil"):
        a, b = metrics.NORMALIZERS[(dataset, kind)]
        a, b = np.atleast_1d(a), np.atleast_1d(b)
        assert set(p[a]) == set(b) and set(p[b]) == set(a)


def test_flip_permutation_unknown_count():
    with pytest.raises(ValueError, match="17"):
        g.flip_permutation(17)


def test_box_from_landmarks():
    pts = np.array([[10.2, 5.9], [40.0, 7.1], [20.5, 30.5]])
    np.testing.assert_array_equal(g.box_from_landmarks(pts), [10, 5, 40, 31])


def test_crop_box_corners_land_on_crop_edges():
    box = np.array([10.0, 20.0, 110.0, 120.0])
    m = g.crop_transform(box, output_size=256, box_scale=1.0)
    out = g.apply_affine(m, np.array([[10.0, 20.0], [110.0, 120.0], [60.0, 70.0], [110.0, 20.0]]))
    np.testing.assert_allclose(
        out, [[-0.5, -0.5], [255.5, 255.5], [127.5, 127.5], [255.5, -0.5]], atol=1e-9
    )


def test_crop_side_uses_long_edge_box_scale_and_zoom():
    box = np.array([0.0, 0.0, 40.0, 100.0])  # 40 wide, 100 tall: side from the height
    m = g.crop_transform(box, output_size=64, box_scale=1.25, scale=2.0)
    side = 100 * 1.25 / 2.0
    pts = np.array([[20.0, 50.0 - side / 2], [20.0 + side / 2, 50.0]])
    np.testing.assert_allclose(g.apply_affine(m, pts), [[31.5, -0.5], [63.5, 31.5]], atol=1e-9)


def test_rotation_sign_matches_cv2_and_is_counter_clockwise():
    box = np.array([50.0, 60.0, 150.0, 160.0])
    m = g.crop_transform(box, output_size=100, box_scale=1.0, rotation_deg=30.0)
    ref = cv2.getRotationMatrix2D((100.0, 110.0), 30.0, 1.0)
    np.testing.assert_allclose(m[:, :2], ref[:, :2], atol=1e-12)
    # A point right of the centre moves up on screen (smaller y) for a positive angle.
    m90 = g.crop_transform(box, output_size=100, box_scale=1.0, rotation_deg=90.0)
    np.testing.assert_allclose(
        g.apply_affine(m90, np.array([[110.0, 110.0]])), [[49.5, 39.5]], atol=1e-9
    )


def test_flip_maps_x_to_out_minus_1_minus_x():
    box = np.array([5.0, 7.0, 95.0, 80.0])
    pts = np.random.default_rng(0).uniform(0, 100, size=(10, 2))
    a = g.apply_affine(g.crop_transform(box, 128, rotation_deg=12.0, scale=0.9), pts)
    b = g.apply_affine(g.crop_transform(box, 128, rotation_deg=12.0, scale=0.9, flip=True), pts)
    np.testing.assert_allclose(b[:, 0], 127 - a[:, 0], atol=1e-9)
    np.testing.assert_allclose(b[:, 1], a[:, 1], atol=1e-9)


def test_round_trip_points_to_crop_and_back():
    rng = np.random.default_rng(1)
    for _ in range(20):
        x0, y0 = rng.uniform(0, 200, 2)
        box = np.array([x0, y0, x0 + rng.uniform(20, 150), y0 + rng.uniform(20, 150)])
        m = g.crop_transform(
            box,
            256,
            box_scale=rng.uniform(1, 1.5),
            rotation_deg=rng.uniform(-30, 30),
            scale=rng.uniform(0.75, 1.25),
            flip=bool(rng.integers(2)),
        )
        pts = rng.uniform(-50, 400, size=(7, 2))
        back = g.apply_affine(g.invert_affine(m), g.apply_affine(m, pts))
        np.testing.assert_allclose(back, pts, atol=1e-9)


def test_apply_and_invert_broadcast_over_batch():
    rng = np.random.default_rng(2)
    ms = np.stack(
        [
            g.crop_transform(np.array([0, 0, 50.0 + i, 60.0]), 64, rotation_deg=10.0 * i)
            for i in range(3)
        ]
    )
    pts = rng.uniform(0, 60, size=(3, 5, 2)).astype(np.float32)
    out = g.apply_affine(ms, pts)
    assert out.shape == (3, 5, 2) and out.dtype == np.float32
    for i in range(3):
        ref = np.array([ms[i] @ np.array([x, y, 1.0]) for x, y in pts[i]])
        np.testing.assert_allclose(out[i], ref, rtol=1e-6)
    inv = g.invert_affine(ms)
    for i in range(3):
        np.testing.assert_allclose(inv[i], g.invert_affine(ms[i]), atol=1e-12)


def _blob(h, w, cx, cy, sigma, channels):
    yy, xx = np.mgrid[0:h, 0:w]
    img = 255.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return np.repeat(np.round(img).astype(np.uint8)[..., None], channels, axis=-1)


def _centroid(img):
    w = img.astype(np.float64)
    w[w < 8] = 0  # ignore quantisation dust far from the dot
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    return np.array([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_warp_image_agrees_with_apply_affine(channels, flip):
    dot = np.array([130.3, 84.6])
    img = _blob(200, 300, dot[0], dot[1], 4.0, channels)
    box = np.array([90.0, 40.0, 200.0, 150.0])
    m = g.crop_transform(box, 128, rotation_deg=25.0, scale=1.1, flip=flip)
    out = g.warp_image(img, m, 128)
    assert out.shape == (128, 128, channels) and out.dtype == np.uint8
    expected = g.apply_affine(m, dot[None])[0]
    np.testing.assert_allclose(_centroid(out[..., 0]), expected, atol=0.1)


def test_warp_image_zero_border():
    img = np.full((20, 20, 3), 200, np.uint8)
    m = g.crop_transform(np.array([0.0, 0.0, 19.0, 19.0]), 32, box_scale=3.0)
    out = g.warp_image(img, m, 32)
    assert out[0, 0, 0] == 0 and out[16, 16, 0] == 200


def test_flip_landmarks():
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 255, size=(68, 2))
    f = g.flip_landmarks(pts, 256)
    p = g.flip_permutation(68)
    np.testing.assert_allclose(f[:, 0], 255 - pts[p, 0])
    np.testing.assert_allclose(f[:, 1], pts[p, 1])
    np.testing.assert_allclose(g.flip_landmarks(f, 256), pts)
    np.testing.assert_allclose(f[36], [255 - pts[45, 0], pts[45, 1]])
    # Flipping in the crop equals cropping with flip=True and permuting.
    box = np.array([10.0, 10.0, 200.0, 220.0])
    m, mf = g.crop_transform(box, 256), g.crop_transform(box, 256, flip=True)
    np.testing.assert_allclose(
        g.flip_landmarks(g.apply_affine(m, pts), 256), g.apply_affine(mf, pts)[p], atol=1e-9
    )
