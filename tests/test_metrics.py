"""Tests for fan_jax.metrics with hand-computed values."""

import numpy as np
import pytest

from fan_jax import metrics as m


@pytest.mark.parametrize(
    "dataset,num,kind,a,b",
    [
        ("wflw", 98, "inter_ocular", 60, 72),
        ("wflw", 98, "inter_pupil", 96, 97),
        ("300w", 68, "inter_ocular", 36, 45),
        ("cofw", 29, "inter_ocular", 8, 9),
        ("cofw", 29, "inter_pupil", 16, 17),
    ],
)
def test_normalizer_point_pairs(dataset, num, kind, a, b):
    gt = np.zeros((2, num, 2))
    gt[0, a], gt[0, b] = (10, 20), (13, 24)  # 3-4-5 triangle
    gt[1, a], gt[1, b] = (50, 5), (50, 45)
    np.testing.assert_allclose(m.normalizer_distances(gt, dataset, kind), [5.0, 40.0])


def test_300w_inter_pupil_is_distance_between_eye_point_means():
    gt = np.zeros((1, 68, 2))
    angles = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], -1) * 5
    gt[0, 36:42] = ring + np.array([10, 20])  # six points whose mean is the left pupil (10, 20)
    gt[0, 42:48] = ring * 0.8 + (40, 24)
    gt[0, 36] += (0.6, 0.0)  # move one point: the mean moves by 0.1 in x
    expected = np.hypot(40 - 10.1, 24 - 20)
    np.testing.assert_allclose(m.normalizer_distances(gt, "300w", "inter_pupil"), [expected])
    # The builder's name works as well, and the outer corners give a different number.
    np.testing.assert_allclose(m.normalizer_distances(gt, "the300w", "inter_pupil"), [expected])
    assert not np.isclose(m.normalizer_distances(gt, "300w", "inter_ocular")[0], expected)


def test_unknown_normaliser():
    with pytest.raises(ValueError, match="inter_nose"):
        m.normalizer_distances(np.zeros((1, 68, 2)), "300w", "inter_nose")


def test_nme_three_images():
    gt = np.random.default_rng(0).uniform(0, 100, size=(3, 4, 2))
    pred = gt.copy()
    pred[0] += (3.0, 4.0)  # every point off by 5 px (25 if it were squared)
    pred[1, :2] += (0.0, 2.0)  # half the points off by 2 px: mean 1 px
    norm = np.array([50.0, 20.0, 7.0])
    np.testing.assert_allclose(m.nme(pred, gt, norm), [0.1, 0.05, 0.0], atol=1e-12)


def test_failure_rate_is_strictly_greater():
    assert m.failure_rate(np.array([0.05, 0.1, 0.15, 0.2])) == 0.5
    assert m.failure_rate(np.array([0.05, 0.1, 0.15, 0.2]), threshold=0.08) == 0.75


def test_ced_grid_and_values():
    nmes = np.array([0.0, 0.05, 0.05, 0.2])
    x, y = m.ced(nmes)
    assert x.shape == y.shape == (1001,)
    assert x[0] == 0.0 and x[-1] == 0.1
    np.testing.assert_allclose(np.diff(x), 1e-4, rtol=1e-9)
    np.testing.assert_allclose(y, np.mean(nmes[:, None] <= x[None], axis=0))
    assert y[0] == 0.25 and y[-1] == 0.75 and y[500] == 0.75 and y[499] == 0.25


def test_auc_hand_values():
    step_err = 1e-4 / 0.1  # one trapezoid interval, relative to the 0.1 range
    assert m.auc(np.zeros(5)) == 1.0
    assert m.auc(np.array([0.3, 0.11])) == 0.0
    assert abs(m.auc(np.array([0.05])) - 0.5) <= step_err
    # Steps at 0.02 and 0.06: 0.5 * 0.04 + 1.0 * 0.04 = 0.06 of area over 0.1.
    assert abs(m.auc(np.array([0.02, 0.06])) - 0.6) <= step_err


def test_auc_against_closed_form():
    # The exact integral of the step CED is mean(max(0, t - nme)) / t; trapezoid is within a step.
    nmes = np.random.default_rng(1).gamma(2.0, 0.025, size=500)
    exact = np.mean(np.clip(0.1 - nmes, 0, None)) / 0.1
    assert abs(m.auc(nmes) - exact) <= 1e-3
    assert (
        abs(m.auc(nmes, threshold=0.08) - np.mean(np.clip(0.08 - nmes, 0, None)) / 0.08) <= 1.25e-3
    )


def test_summarize():
    s = m.summarize(np.array([0.02, 0.06, 0.2]))
    np.testing.assert_allclose(s["nme"], 0.28 / 3)
    assert s["fr@0.1"] == pytest.approx(1 / 3)
    assert abs(s["auc@0.1"] - (0.08 + 0.04) / 3 / 0.1) <= 1e-3
