"""Tests for fan_jax.input_pipeline (small in-memory sources; one multiprocess test)."""

import json
import os
import sys

import cv2
import numpy as np
import pytest

from fan_jax import geometry, landmarks
from fan_jax import input_pipeline as ip

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.sections.pipeline import measure_throughput

S = 256


def _palette(n: int) -> np.ndarray:
    """n well-separated saturated colours (none black, which is the warp border)."""
    hsv = np.stack(
        [
            np.linspace(0, 179, n, endpoint=False),
            np.full(n, 255),
            np.where(np.arange(n) % 2, 255, 160),
        ],
        -1,
    )
    return cv2.cvtColor(hsv[None].astype(np.uint8), cv2.COLOR_HSV2RGB)[0].astype(np.int32)


def _dot_example(num_landmarks=29, radius=4):
    """A 300x300 black image with a disc of a distinct colour at each grid landmark."""
    xs, ys = np.meshgrid(np.arange(6) * 20 + 100, np.arange(5) * 20 + 100)
    lm = np.stack([xs.ravel(), ys.ravel()], -1)[:num_landmarks].astype(np.float32)
    pal = _palette(num_landmarks)
    img = np.zeros((300, 300, 3), np.uint8)
    for p, c in zip(lm.astype(int), pal):
        cv2.circle(img, tuple(int(v) for v in p), radius, tuple(int(v) for v in c), -1)
    return {"image": img, "landmarks": lm, "box": geometry.box_from_landmarks(lm)}, pal


def _check_dots(out, pal, flipped):
    """Each in-crop landmark sits on the dot of the source landmark it came from."""
    perm = geometry.flip_permutation(len(pal)) if flipped else np.arange(len(pal))
    img, pts = out["image"], out["landmarks"]
    inside = np.all((pts > 3) & (pts < S - 4), axis=1)
    assert inside.sum() >= len(pal) // 2
    for i in np.flatnonzero(inside):
        x, y = np.rint(pts[i]).astype(int)
        colour = img[y, x].astype(np.int32)
        nearest = np.argmin(np.abs(pal - colour).sum(-1))
        assert nearest == perm[i], (i, pts[i], colour)


@pytest.mark.parametrize(
    "rotation,scale,flip",
    [(0.0, 1.0, False), (30.0, 0.75, False), (-30.0, 1.25, True), (17.0, 0.9, True)],
)
def test_warped_dots_at_transformed_landmarks(rotation, scale, flip):
    ex, pal = _dot_example()
    t = ip.TrainTransform(29, ip.AugmentConfig())
    _check_dots(t.apply(ex, rotation, scale, flip), pal, flip)


def test_warped_dots_through_random_pipeline():
    ex, pal = _dot_example()
    cfg = ip.AugmentConfig(p_rotate=1.0)
    it = ip.train_iterator(
        [ex] * 4, 29, seed=3, global_batch_size=4, augment=cfg, shard_index=0, shard_count=1
    )
    flips = set()
    for _ in range(3):
        batch = next(it)
        for b in range(4):
            out = {k: v[b] for k, v in batch.items()}
            # Which way was it flipped? The dots decide, so both hypotheses are tried.
            try:
                _check_dots(out, pal, False)
                flips.add(False)
            except AssertionError:
                _check_dots(out, pal, True)
                flips.add(True)
    assert flips == {False, True}


def _symmetric_face68(seed=0):
    """68 points mirror-symmetric about x=150 under the 300W permutation; 36 on image-left."""
    perm = geometry.flip_permutation(68)
    rng = np.random.default_rng(seed)
    pts = rng.uniform(100, 200, (68, 2))
    for i in range(68):
        j = perm[i]
        if j == i:
            pts[i, 0] = 150.0
        elif i < j:
            pts[j] = (300.0 - pts[i, 0], pts[i, 1])
    pts[36], pts[45] = (110.0, 120.0), (190.0, 120.0)
    return pts.astype(np.float32)


def test_flip_keeps_subject_right_eye_on_image_left():
    lm = _symmetric_face68()
    img = np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    ex = {"image": img, "landmarks": lm}
    t = ip.TrainTransform(68, ip.AugmentConfig())
    plain = t.apply(ex, 0.0, 1.1, False)
    flipped = t.apply(ex, 0.0, 1.1, True)
    assert flipped["landmarks"][36, 0] < flipped["landmarks"][45, 0]
    assert plain["landmarks"][36, 0] < plain["landmarks"][45, 0]
    # A symmetric face flipped with the permutation lands on the same points.
    np.testing.assert_allclose(flipped["landmarks"], plain["landmarks"], atol=1e-3)
    # cv2's fixed-point bilinear weights may round the mirrored pixels 1 level apart.
    diff = np.abs(flipped["image"].astype(int) - plain["image"][:, ::-1].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    np.testing.assert_allclose(
        flipped["landmarks"], geometry.flip_landmarks(plain["landmarks"], S), atol=1e-3
    )


def test_sample_params_distribution():
    cfg = ip.AugmentConfig(p_rotate=0.6, p_flip=0.5)
    t = ip.TrainTransform(68, cfg)
    rng = np.random.default_rng(0)
    rot, scale, flip = map(np.array, zip(*(t.sample_params(rng) for _ in range(4000))))
    assert np.all(np.abs(rot) <= 30.0) and np.all((scale >= 0.75) & (scale <= 1.25))
    assert abs(np.mean(rot != 0) - 0.6) < 0.04
    assert abs(np.mean(flip) - 0.5) < 0.04
    assert abs(np.mean(np.abs(rot[rot != 0])) - 15.0) < 1.0
    never = ip.TrainTransform(68, ip.AugmentConfig(p_rotate=0.0, p_flip=0.0))
    assert all(r == 0.0 and not f for r, _, f in (never.sample_params(rng) for _ in range(200)))


def test_photometric_off_by_default_and_geometry_unchanged():
    ex, _ = _dot_example()
    rng_seed = 5
    plain = ip.TrainTransform(29, ip.AugmentConfig())
    jitter = ip.TrainTransform(29, ip.AugmentConfig(photometric=True, brightness=0.4))
    a = plain.random_map(ex, np.random.default_rng(rng_seed))
    b = jitter.random_map(ex, np.random.default_rng(rng_seed))
    np.testing.assert_array_equal(
        a["image"], plain.apply(ex, *plain.sample_params(np.random.default_rng(rng_seed)))["image"]
    )
    np.testing.assert_array_equal(a["landmarks"], b["landmarks"])
    assert not np.array_equal(a["image"], b["image"])
    assert b["image"].dtype == np.uint8


def test_box_source_dataset_uses_stored_box():
    ex, _ = _dot_example()
    ex = dict(ex, box=np.float32([50, 50, 250, 250]))
    out = ip.TrainTransform(29, ip.AugmentConfig(box_source="dataset")).apply(ex, 0, 1, False)
    m = geometry.crop_transform(ex["box"], S, 1.25)
    np.testing.assert_allclose(
        out["landmarks"], geometry.apply_affine(m, ex["landmarks"]), atol=1e-4
    )
    with pytest.raises(ValueError):
        ip.AugmentConfig(box_source="detector")


def test_augment_config_from_mapping():
    cfg = ip.AugmentConfig.from_mapping(
        {"p_rotate": 1.0, "scale_range": [0.9, 1.1], "learning_rate": 1e-3}
    )
    assert cfg.p_rotate == 1.0 and cfg.scale_range == (0.9, 1.1)


def test_decode_image_bytes_and_greyscale():
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    np.testing.assert_array_equal(ip.decode_image(png.tobytes()), rgb)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(ip.decode_image(grey), np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(
        ip.decode_image(grey[..., None]), np.repeat(grey[..., None], 3, -1)
    )


def test_normalize_device_matches_numpy():
    img = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    ref = (img / 255.0 - np.array(landmarks.IMAGENET_MEAN)) / np.array(landmarks.IMAGENET_STD)
    out = np.asarray(landmarks.normalize(img))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(landmarks.normalize_np(img), ref, atol=1e-5)


def _random_source(n, num_landmarks=68, seed=0, jpeg_every=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 255, (120, 140, 3), dtype=np.uint8)
        lm = rng.uniform(30, 100, (num_landmarks, 2)).astype(np.float32)
        to_orig = np.array([[2.5, 0.3, 40.0], [-0.3, 2.5, 17.0]], np.float32)
        if jpeg_every and i % jpeg_every == 0:
            img = cv2.imencode(".jpg", img)[1].tobytes()
        out.append(
            {
                "image": img,
                "landmarks": lm,
                "box": geometry.box_from_landmarks(lm),
                "to_original": to_orig,
                "original_landmarks": geometry.apply_affine(to_orig, lm).astype(np.float32),
                "file_name": f"img_{i}.jpg",
                "attributes": np.arange(6) % 2 == i % 2,
            }
        )
    return out


def _batches(it, k):
    return [next(it) for _ in range(k)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_deterministic_for_seed():
    src = _random_source(6, jpeg_every=2)
    kw = dict(global_batch_size=2, shard_index=0, shard_count=1)
    a = _batches(ip.train_iterator(src, 68, seed=7, **kw), 4)
    b = _batches(ip.train_iterator(src, 68, seed=7, num_threads=0, **kw), 4)
    c = _batches(ip.train_iterator(src, 68, seed=8, **kw), 4)
    assert a[0]["image"].shape == (2, S, S, 3) and a[0]["image"].dtype == np.uint8
    assert a[0]["landmarks"].shape == (2, 68, 2) and a[0]["landmarks"].dtype == np.float32
    assert _same(a, b)
    assert not _same(a, c)
    # Epochs (3 batches here) are reshuffled and re-augmented, not replayed.
    assert not np.array_equal(a[0]["landmarks"], a[3]["landmarks"])


def test_resume_from_state_gives_next_batch():
    src = _random_source(6)
    kw = dict(seed=1, global_batch_size=2, shard_index=0, shard_count=1)
    it = ip.train_iterator(src, 68, **kw)
    _batches(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # what orbax's grain handler stores
    expected = _batches(it, 2)
    fresh = ip.train_iterator(src, 68, **kw)
    fresh.set_state(state)
    assert _same(_batches(fresh, 2), expected)


def test_two_workers_match_in_process_stream_and_resume():
    src = _random_source(6, jpeg_every=3)
    kw = dict(seed=2, global_batch_size=2, shard_index=0, shard_count=1)
    ref = _batches(ip.train_iterator(src, 68, **kw), 5)
    it = ip.train_iterator(src, 68, num_workers=2, **kw)
    try:
        got = _batches(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        got += _batches(it, 2)
    finally:
        it.close()
    assert _same(got, ref)
    fresh = ip.train_iterator(src, 68, num_workers=2, **kw)
    try:
        fresh.set_state(state)
        assert _same(_batches(fresh, 2), ref[3:])
    finally:
        fresh.close()


def _tag_source(n):
    """Constant-colour images: the colour at the crop centre names the example."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = np.zeros((100, 100, 3), np.uint8)
        img[:] = (10 * i, 255 - 10 * i, 7)
        out.append({"image": img, "landmarks": rng.uniform(20, 80, (29, 2)).astype(np.float32)})
    return out


def test_shards_are_disjoint_and_cover_the_source():
    n, global_batch = 10, 4
    src = _tag_source(n)
    seen = []
    for shard in range(2):
        it = ip.train_iterator(
            src, 29, seed=0, global_batch_size=global_batch, shard_index=shard, shard_count=2
        )
        ids = []
        for _ in range(5):  # 5 batches of 2 = two epochs of a 5-example shard
            batch = next(it)
            assert batch["image"].shape[0] == global_batch // 2
            ids += [int(round(c / 10)) for c in batch["image"][:, S // 2, S // 2, 0]]
        assert sorted(ids[:5]) == sorted(ids[5:]) and len(set(ids[:5])) == 5
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(n))
    with pytest.raises(ValueError):
        ip.train_iterator(src, 29, seed=0, global_batch_size=5, shard_index=0, shard_count=2)


def test_eval_batches_map_back_to_original_and_pad():
    src = _random_source(7, jpeg_every=2)
    batches = list(ip.eval_batches(src, 4, shard_index=0, shard_count=1))
    assert len(batches) == 2 == ip.num_eval_batches(7, 4)
    for b in batches:
        assert b["image"].shape == (4, S, S, 3) and b["crop_to_original"].shape == (4, 2, 3)
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(valid, [True] * 7 + [False])
    np.testing.assert_array_equal(index[:7], np.arange(7))
    assert batches[1]["file_name"][2] == b"img_6.jpg"
    np.testing.assert_array_equal(batches[0]["attributes"][1], src[1]["attributes"])
    for b in batches:
        back = geometry.apply_affine(b["crop_to_original"], b["landmarks"])
        np.testing.assert_allclose(back, b["original_landmarks"], atol=1e-3)
    # The eval crop is the train crop with no augmentation.
    t = ip.TrainTransform(68, ip.AugmentConfig())
    plain = t.apply(src[5], 0.0, 1.0, False)
    np.testing.assert_array_equal(batches[1]["image"][1], plain["image"])
    np.testing.assert_allclose(batches[1]["landmarks"][1], plain["landmarks"], atol=1e-4)
    # The crop-space points really are on the crop: the map is not just to_original.
    assert not np.allclose(
        geometry.apply_affine(src[0]["to_original"], batches[0]["landmarks"][0]),
        src[0]["original_landmarks"],
        atol=1.0,
    )


def test_eval_shards_have_equal_length_and_partition():
    src = _random_source(5)
    per = [list(ip.eval_batches(src, 2, shard_index=s, shard_count=2)) for s in range(2)]
    assert len(per[0]) == len(per[1]) == ip.num_eval_batches(5, 2, shard_count=2) == 2
    got = [set(np.concatenate([b["index"][b["valid"]] for b in bs]).tolist()) for bs in per]
    assert not got[0] & got[1] and got[0] | got[1] == set(range(5))


def test_measure_throughput_runs():
    ips = measure_throughput(_random_source(4), 0, batch_size=2, num_batches=2, warmup_batches=1)
    assert np.isfinite(ips) and ips > 0


def test_tfds_data_source_end_to_end(tmp_path):
    """The real source type: a prepared TFDS split (COFW fixture) read by tfds.data_source."""
    import tensorflow_datasets as tfds

    from fan_jax import data
    from fan_jax_datasets.cofw import fixtures

    tfds.disable_progress_bar()
    fixtures.write_fixture(str(tmp_path / "manual"))
    data.prepare("cofw", tmp_path / "data", tmp_path / "manual")
    src = data.data_source("cofw", "train", tmp_path / "data")
    batches = list(ip.eval_batches(src, 2, box_source="dataset", shard_index=0, shard_count=1))
    assert sum(int(b["valid"].sum()) for b in batches) == len(src)
    for b in batches:
        assert b["occluded"].shape == (2, 29) and b["file_name"].dtype.kind == "S"
        back = geometry.apply_affine(b["crop_to_original"], b["landmarks"])
        np.testing.assert_allclose(back, b["original_landmarks"], atol=1e-3)
    batch = next(
        ip.train_iterator(src, 29, seed=0, global_batch_size=2, shard_index=0, shard_count=1)
    )
    assert batch["image"].shape == (2, S, S, 3) and batch["landmarks"].shape == (2, 29, 2)
