"""Evaluation: decoded peaks map back to the original frame; flip-test; files written.

The fake models render Gaussians at known points and go through the real landmarks function
(`fan_jax.landmarks`: decode, mirror, average), unjitted, so numpy-side checks stay simple.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from fan_jax import evaluate, geometry, heatmaps, landmarks

SIZE, HM = 64, 16  # input and heatmap side (stride 4)


def _crop_points(num_landmarks, rng):
    # Landmarks on integer heatmap pixels decode exactly (no quarter shift on a symmetric peak).
    hm = rng.integers(2, HM - 2, size=(num_landmarks, 2)).astype(np.float64)
    # Keep the two outer eye corners (300W: 36, 45) apart so the normaliser is not zero.
    hm[36] = [3, 6]
    hm[45] = [12, 6]
    return np.asarray(heatmaps.from_heatmap_coords(hm, stride=SIZE // HM))


def _batches(crop_pts, num_images, batch_size, rng):
    """Eval batches whose crops all show the same crop landmarks under different affines."""
    out = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        to_orig = []
        for _ in range(batch_size):
            s, t = rng.uniform(0.5, 3.0), rng.uniform(-np.pi, np.pi)
            lin = s * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
            to_orig.append(np.concatenate([lin, rng.uniform(-100, 100, (2, 1))], axis=1))
        to_orig = np.stack(to_orig)
        images = np.zeros((batch_size, SIZE, SIZE, 3), np.uint8)
        images[:, :, 0, 0] = 255  # marks the unmirrored image: the fake model sees the mirror
        out.append(
            {
                "image": images,
                "crop_to_original": to_orig,
                "original_landmarks": geometry.apply_affine(
                    to_orig, np.broadcast_to(crop_pts, (batch_size, *crop_pts.shape))
                ),
                "valid": np.arange(batch_size) < n,
            }
        )
    return out


class _FakeHeatmapModel:
    """`apply(variables, x)` renders Gaussians at the known points (mirrored when the image is
    mirrored, which the marker pixel tells), like a FAN returning (heatmaps, taps)."""

    def __init__(self, crop_pts, shift_hm=(0.0, 0.0), mirror_shift_hm=None):
        self.pts = jnp.asarray(crop_pts)
        self.mirrored_pts = jnp.asarray(geometry.flip_landmarks(crop_pts, SIZE))
        self.shift = jnp.asarray(shift_hm)
        self.mirror_shift = jnp.asarray(shift_hm if mirror_shift_hm is None else mirror_shift_hm)

    def apply(self, variables, x, train=False):
        mirrored = x[:, 0, -1, 0] > 0  # the marker (255 before normalisation) moved right
        pts = jnp.where(mirrored[:, None, None], self.mirrored_pts[None], self.pts[None])
        shift = jnp.where(mirrored[:, None, None], self.mirror_shift, self.shift)
        hm_pts = heatmaps.to_heatmap_coords(pts, stride=SIZE // HM) + shift
        return heatmaps.render_gaussians(hm_pts, size=HM, sigma=1.0), ()


def _fake_model(crop_pts, shift_hm=(0.0, 0.0), mirror_shift_hm=None, flip=True):
    model = _FakeHeatmapModel(crop_pts, shift_hm, mirror_shift_hm)
    perm = geometry.flip_permutation(len(crop_pts)) if flip else None

    def predict(images):
        plain, flipped = landmarks.landmarks_with_flip(
            "heatmap", model, None, jnp.asarray(images), perm
        )
        return np.asarray(plain), None if flipped is None else np.asarray(flipped)

    return predict


def test_perfect_model_scores_zero_with_and_without_flip(tmp_path):
    rng = np.random.default_rng(0)
    pts = _crop_points(68, rng)
    batches = _batches(pts, num_images=5, batch_size=2, rng=rng)
    res = evaluate.evaluate_splits(
        _fake_model(pts), {"common": lambda: batches}, "300w", "inter_ocular", out_dir=str(tmp_path)
    )
    for setting in ("no_flip", "flip"):
        m = res["common"][setting]
        assert m["num_images"] == 5  # the padded sixth image is dropped
        assert m["nme"] < 1e-5
        assert m["fr"] == 0.0
        assert m["auc"] > 0.999
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["common"]["flip"]) == {"nme", "fr", "auc", "normalizer", "num_images"}
    assert os.path.getsize(tmp_path / "ced_300w.png") > 1000
    assert os.path.getsize(tmp_path / "faces_common.png") > 1000


def test_known_offset_gives_hand_computed_nme():
    rng = np.random.default_rng(1)
    pts = _crop_points(68, rng)
    batches = _batches(pts, num_images=4, batch_size=4, rng=rng)
    # One heatmap pixel right = 4 crop pixels; the crop's eye corners are 9 heatmap px apart,
    # so NME = 4 / 36 whatever similarity maps the crop to the original.
    res = evaluate.evaluate_splits(
        _fake_model(pts, shift_hm=(1.0, 0.0), flip=False),
        {"s": lambda: batches},
        "300w",
        "inter_ocular",
    )
    assert res["s"]["no_flip"]["nme"] == pytest.approx(4 / 36, rel=1e-4)
    assert res["s"]["no_flip"]["fr"] == 1.0
    assert "flip" not in res["s"]


def test_flip_test_averages_the_mirror_back():
    rng = np.random.default_rng(2)
    pts = _crop_points(68, rng)
    batches = _batches(pts, num_images=3, batch_size=3, rng=rng)
    # A model whose mirrored prediction is off: flip-test must land between the two.
    predict = _fake_model(pts, mirror_shift_hm=(0.0, 3.0))
    res = evaluate.evaluate_splits(predict, {"s": lambda: batches}, "300w", "inter_ocular")
    assert res["s"]["no_flip"]["nme"] < 1e-5
    assert res["s"]["flip"]["nme"] > 1e-3  # the bad mirror changed the answer


def test_table_lists_every_split_and_setting():
    row = {"nme": 0.05, "fr": 0.01, "auc": 0.5, "normalizer": "inter_ocular", "num_images": 3}
    text = evaluate.format_table({"MobileFAN": {"full": {"no_flip": row, "flip": row}}})
    assert text.count("MobileFAN") == 2 and "5.00" in text
