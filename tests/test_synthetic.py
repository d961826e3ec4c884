"""Tests for fan_jax.synthetic: determinism, 300W files, landmark topology, grounding."""

import os
import time

import cv2
import numpy as np
import pytest

from fan_jax import synthetic as S
from fan_jax import synthetic_300w as T
from fan_jax.geometry import FLIP_PERMUTATIONS


def _parse_pts(path):
    """Independent strict reader of the 300W .pts layout."""
    with open(path) as fh:
        lines = fh.read().splitlines()
    assert lines[0] == "version: 1"
    assert lines[1] == "n_points:  68"
    assert lines[2] == "{"
    assert lines[71] == "}"
    assert all(ln.strip() == "" for ln in lines[72:])
    return np.array([[float(v) for v in ln.split(" ")] for ln in lines[3:71]])


def _shoelace(p):
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


# ----------------------------------------------------------------------------- render_face


def test_render_shapes_and_bounds():
    for size in (256, (200, 300)):
        img, lm = S.render_face(3, size)
        h, w = (size, size) if np.isscalar(size) else size
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        assert lm.shape == (68, 2) and lm.dtype == np.float32
        assert np.isfinite(lm).all()
        assert (lm >= 0).all() and (lm[:, 0] <= w - 1).all() and (lm[:, 1] <= h - 1).all()


def test_deterministic_per_seed():
    a_img, a_lm = S.render_face(S.image_rng(5, 17), 192)
    b_img, b_lm = S.render_face(S.image_rng(5, 17), 192)
    assert a_img.tobytes() == b_img.tobytes() and a_lm.tobytes() == b_lm.tobytes()
    # An int seed is a generator seed too.
    assert S.render_face(9, 128)[0].tobytes() == S.render_face(9, 128)[0].tobytes()
    for other in (S.image_rng(5, 18), S.image_rng(6, 17), S.image_rng(5, 17, subset=2)):
        c_img, c_lm = S.render_face(other, 192)
        assert c_img.tobytes() != a_img.tobytes()
        assert not np.allclose(c_lm, a_lm)


def test_stage_switches_keep_other_stages():
    """Turning occluders / degradation off must not change the face (each stage has its own stream)."""
    _, lm_full, _ = S._render(S.image_rng(1, 2), 160)
    _, lm_clean, _ = S._render(
        S.image_rng(1, 2), 160, occluders=False, degrade=False, features=False
    )
    np.testing.assert_array_equal(lm_full, lm_clean)


# ----------------------------------------------------------------------------- topology


def _frontal(seed, size=320, **kw):
    return S._render(
        S.image_rng(seed, 0, 77), size, pose=(0, 0, 0), occluders=False, degrade=False, **kw
    )


def test_topology_frontal_faces():
    for seed in range(12):
        _, lm, f = _frontal(seed)
        x, y = lm[:, 0], lm[:, 1]
        r_eye, l_eye = lm[36:42].mean(0), lm[42:48].mean(0)
        assert r_eye[0] < l_eye[0]  # subject's right eye on the image left
        assert r_eye[0] < x[30] < l_eye[0]  # nose tip between the eyes...
        assert y[30] > max(r_eye[1], l_eye[1])  # ...and below them
        assert y[27] < y[28] < y[29] < y[30] < y[33]  # bridge runs down to the tip, base below
        assert np.all(np.diff(x[31:36]) > 0)  # nostrils left to right
        mouth = lm[48:68].mean(0)
        assert mouth[1] > y[33] and y[8] > lm[48:60, 1].max()  # mouth below the nose, chin below it
        # Jaw: along the outline from the image left over the chin to the image right.
        assert np.all(np.diff(x[0:17]) > 0)
        assert np.all(np.diff(y[0:9]) > 0) and np.all(np.diff(y[8:17]) < 0)
        steps = np.linalg.norm(np.diff(lm[0:17], axis=0), axis=1)
        assert steps.max() < 1.6 * steps.min()  # roughly equal spacing along the contour
        # Brows: outer to inner then inner to outer, above the eyes.
        assert np.all(np.diff(x[17:27]) > 0)
        assert lm[17:22, 1].max() < lm[36:42, 1].min() and lm[22:27, 1].max() < lm[42:48, 1].min()
        # Eye corners: 36 outer / 39 inner (right eye), 42 inner / 45 outer (left eye).
        assert x[36] < x[39] < x[42] < x[45]
        assert x[17] < x[36] and x[26] > x[45]
        # Contours clockwise as displayed (positive shoelace area with y down).
        if f.eye_open.min() > 0.2:
            assert _shoelace(lm[36:42]) > 0 and _shoelace(lm[42:48]) > 0
            assert y[37] < y[41] and y[38] < y[40] and y[43] < y[47] and y[44] < y[46]
        assert _shoelace(lm[48:60]) > 0
        assert x[48] < x[51] < x[54] and y[51] < y[57]
        assert x[60] < x[62] < x[64] and y[62] <= y[66] + 1e-4
        if f.mouth_open > 0.05:
            assert _shoelace(lm[60:68]) > 0
        # Inner lip inside the outer lip.
        assert x[48] < x[60] and x[64] < x[54] and y[51] < y[62] and y[66] < y[57]


def test_mirror_symmetry_matches_flip_permutation():
    """A symmetric, frontal, unrotated face mirrored in x and permuted must equal itself."""
    perm = FLIP_PERMUTATIONS[68]
    for seed in range(5):
        f = S._sample_face(np.random.default_rng(seed), False)
        f.yaw = f.pitch = f.roll = 0.0
        f.part_jitter[:] = 0.0
        f.point_jitter[:] = 0.0
        f.eye_open[:] = f.eye_open[0]
        g = S._layout(f, 320, 320, np.random.default_rng(0))
        lm = g["landmarks"]
        cx = lm[8, 0]
        mirrored = np.stack([2 * cx - lm[:, 0], lm[:, 1]], 1)[perm]
        np.testing.assert_allclose(mirrored, lm, atol=1e-6)


def test_yaw_moves_nose_toward_far_side():
    for seed in range(6):
        _, _lm0, _ = S._render(S.image_rng(seed, 0, 78), 320, pose=(0, 0, 0))
        _, lm, _ = S._render(S.image_rng(seed, 0, 78), 320, pose=(30, 0, 0))
        # Positive yaw turns the face toward +x: nose past the jaw midline, far (left-eye) side narrower.
        mid = 0.5 * (lm[0, 0] + lm[16, 0])
        assert lm[30, 0] > mid
        assert lm[16, 0] - lm[30, 0] < lm[30, 0] - lm[0, 0]
        far_w = np.linalg.norm(lm[45] - lm[42])
        near_w = np.linalg.norm(lm[39] - lm[36])
        assert far_w < near_w
        # The outline stays ordered left to right.
        assert np.all(np.diff(lm[0:17, 0]) > 0)


def test_challenging_faces_are_harder():
    rng = np.random.default_rng(0)
    normal = [S._sample_face(rng, False) for _ in range(300)]
    hard = [S._sample_face(rng, True) for _ in range(300)]
    assert np.mean([abs(f.yaw) for f in hard]) > 1.3 * np.mean([abs(f.yaw) for f in normal])
    assert np.mean([abs(f.roll) for f in hard]) > 1.3 * np.mean([abs(f.roll) for f in normal])


# ----------------------------------------------------------------------------- grounding


def _window_diff(a, b, p, r=1):
    x, y = np.round(p).astype(int)
    wa = a[y - r : y + r + 1, x - r : x + r + 1].astype(int)
    wb = b[y - r : y + r + 1, x - r : x + r + 1].astype(int)
    return np.abs(wa - wb).sum(-1).max()


def test_features_are_drawn_at_their_landmarks():
    """Eyes, brows, nose and mouth landmarks sit on pixels their drawing changed."""
    for seed in range(8):
        drawn, lm, _ = _frontal(seed, 384)
        bare, lm2, _ = _frontal(seed, 384, features=False)
        np.testing.assert_array_equal(lm, lm2)
        for i in range(17, 68):
            # The bridge is a faint shading line on purpose; everything else is a solid drawing.
            assert _window_diff(drawn, bare, lm[i]) > (12 if 27 <= i <= 29 else 30), (seed, i)
        # And the eye / mouth interiors are not skin: the pixel right at the eye centre changed.
        for idx in (S.RIGHT_EYE, S.LEFT_EYE, S.OUTER_LIP):
            assert _window_diff(drawn, bare, lm[idx].mean(0), r=0) > 30, (seed, idx[0])


def test_jaw_lies_on_the_face_outline():
    """Each jaw point has flat skin and clearly different pixels (background, neck, jaw line)
    within 3 px: it sits on the drawn outline."""
    for seed in range(10):
        f = S._sample_face(np.random.default_rng(seed), False)
        f.yaw = f.pitch = f.roll = 0.0
        f.shade = 1.0  # no rim shading, so the face interior is exactly the skin colour
        g = S._layout(f, 320, 320, np.random.default_rng(seed))
        img = np.zeros((320, 320, 3), np.uint8)
        img[...] = (0, 255, 0)
        S._draw_face(img, f, g, features=False)
        dist = np.abs(img.astype(float) - np.clip(f.skin, 0, 255)).sum(-1)
        for i, p in enumerate(g["landmarks"][:17]):
            x, y = np.round(p).astype(int)
            win = dist[y - 3 : y + 4, x - 3 : x + 4]
            assert win.min() < 4 and win.max() > 25, (seed, i)


# ----------------------------------------------------------------------------- 300W tree


def test_subset_counts():
    c = T.subset_counts(3148, 689)
    assert c == {
        "afw": 337,
        "helen/trainset": 2000,
        "lfpw/trainset": 811,
        "helen/testset": 330,
        "lfpw/testset": 224,
        "ibug": 135,
    }
    for n_train, n_test in ((0, 0), (1, 1), (7, 2), (10, 5), (101, 33)):
        c = T.subset_counts(n_train, n_test)
        assert sum(c[k] for k in ("afw", "helen/trainset", "lfpw/trainset")) == n_train
        assert sum(c[k] for k in ("helen/testset", "lfpw/testset", "ibug")) == n_test
        if n_test >= 2:
            assert c["ibug"] >= 1 and c["helen/testset"] + c["lfpw/testset"] >= 1


def test_write_300w_tree(tmp_path):
    out = str(tmp_path / "300w")
    size = 96
    counts = T.write_300w_tree(out, num_train=7, num_test=5, seed=3, size=size)
    assert counts["train"] == 7 and counts["full"] == 5 and counts["total"] == 12
    assert counts["challenging"] == counts["ibug"] >= 1
    assert counts["common"] == counts["helen/testset"] + counts["lfpw/testset"]
    names = T.tree_file_names(counts)
    spaced = 0
    exts = set()
    for folder, _, _, ext, _ in S.SUBSETS:
        d = os.path.join(out, folder)
        files = sorted(os.listdir(d))
        images = [n for n in files if n.endswith((".jpg", ".png"))]
        assert len(images) == counts[folder]
        assert len([n for n in files if n.endswith(".pts")]) == counts[folder]
        assert sorted(names[folder]) == sorted(images)
        for i, name in enumerate(names[folder]):
            assert name.endswith(ext)
            exts.add(ext)
            spaced += " " in name
            path = os.path.join(d, name)
            img = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            ref_img, ref_lm = T.render_tree_image(3, folder, i, size)
            assert img.shape == ref_img.shape and img.shape[0] == size
            if ext == ".png":  # lossless: the very pixels that were rendered
                np.testing.assert_array_equal(img, ref_img)
            else:
                assert np.abs(img.astype(int) - ref_img).mean() < 12
            pts = _parse_pts(os.path.splitext(path)[0] + ".pts")
            np.testing.assert_allclose(pts, ref_lm.astype(np.float64) + 1.0, atol=1e-5)
            np.testing.assert_allclose(T.read_pts(os.path.splitext(path)[0] + ".pts"), pts)
    assert spaced == 1 and exts == {".jpg", ".png"}
    assert os.path.exists(os.path.join(out, "synthetic_300w.json"))

    # Same seed, same bytes; an existing tree is only replaced on request.
    with pytest.raises(FileExistsError):
        T.write_300w_tree(out, 2, 2, seed=3, size=size)
    out2 = str(tmp_path / "again")
    T.write_300w_tree(out2, 7, 5, seed=3, size=size)
    for folder in names:
        for name in names[folder]:
            for p in (name, os.path.splitext(name)[0] + ".pts"):
                with (
                    open(os.path.join(out, folder, p), "rb") as fa,
                    open(os.path.join(out2, folder, p), "rb") as fb,
                ):
                    assert fa.read() == fb.read()
    small = T.write_300w_tree(out, 2, 2, seed=3, size=size, overwrite=True)
    n_files = sum(len(os.listdir(os.path.join(out, s[0]))) for s in S.SUBSETS)
    assert n_files == 2 * small["total"]


def test_parallel_write_matches_serial(tmp_path):
    T.write_300w_tree(str(tmp_path / "a"), 3, 2, seed=4, size=64, workers=1)
    T.write_300w_tree(str(tmp_path / "b"), 3, 2, seed=4, size=64, workers=2)
    for root, _, files in os.walk(tmp_path / "a"):
        for name in files:
            if name.endswith(".json"):
                continue
            rel = os.path.relpath(os.path.join(root, name), tmp_path / "a")
            other = os.path.join(str(tmp_path / "b"), rel)
            with open(os.path.join(root, name), "rb") as fa, open(other, "rb") as fb:
                assert fa.read() == fb.read(), name


def test_cli(tmp_path, capsys):
    counts = T.main(
        [
            "--out",
            str(tmp_path / "t"),
            "--num_train",
            "3",
            "--num_test",
            "2",
            "--seed",
            "1",
            "--size",
            "64",
        ]
    )
    printed = capsys.readouterr().out
    assert "images/s" in printed and counts["total"] == 5
    assert os.path.isdir(tmp_path / "t" / "helen" / "trainset")


def test_throughput():
    """Prints single-process images/s (not asserted: the machine is shared)."""
    n, size = 30, 256
    S.render_face(0, size)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        img, _ = S.render_face(S.image_rng(0, i), size)
        cv2.imencode(".jpg", img)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"\nsynthetic: {n / wall:.0f} images/s wall, {n / cpu:.0f} images/s cpu ({size} px, render + jpeg)"
    )
