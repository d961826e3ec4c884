"""Video: One-Euro smoothing measured through the tracker on clips made from a real photo
(jitter on a still face, lag on a moving one), face ids across frames, the CLI on a clip, and
the errors for bad videos, codecs and cameras."""

import json
import os
import sys

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from fan_jax import predict, video

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers

helpers.register_tiny_models()
FPS = 30.0


class PooledColour:
    """A parameter-free 'model': heatmap k is the 4x4-pooled colour channel k of the crop."""

    def apply(self, variables, x, train=False):
        import jax.numpy as jnp

        b, h, w, _ = x.shape
        pooled = x.reshape(b, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4))
        return jnp.stack([pooled[..., c] for c in (0, 1, 2)], axis=-1), ()


class Centroids:
    """A parameter-free 'model' with a real model's kind of jitter: heatmap k is one Gaussian
    at the brightness-weighted centroid of colour channel k of the crop, so its peak follows
    image content smoothly and pixel noise moves it a little."""

    def apply(self, variables, x, train=False):
        import jax.numpy as jnp

        b, h, _w, _ = x.shape
        hm = h // 4
        pooled = x.reshape(b, hm, 4, hm, 4, 3).mean(axis=(2, 4))
        ys, xs = jnp.meshgrid(
            jnp.arange(hm, dtype=jnp.float32), jnp.arange(hm, dtype=jnp.float32), indexing="ij"
        )
        maps = []
        for c in (0, 1, 2):
            wgt = jnp.exp(2.0 * pooled[..., c])
            wgt = wgt / wgt.sum(axis=(1, 2), keepdims=True)
            cx = (wgt * xs).sum(axis=(1, 2))[:, None, None]
            cy = (wgt * ys).sum(axis=(1, 2))[:, None, None]
            maps.append(jnp.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / 2.0))
        return jnp.stack(maps, axis=-1), ()


def _photo(size=160):
    img = skdata.astronaut()[40:260, 140:360]  # the face and shoulders
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def _noisy(img, rng, sigma=4.0):
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def _shift(img, dx):
    m = np.float32([[1, 0, dx], [0, 1, 0]])
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REFLECT)


def _tracker(box_half=40.0, box_from_landmarks=None, **kw):
    pred = predict.Predictor(
        {"params": {}},
        Centroids(),
        num_landmarks=3,
        input_size=64,
        detector=lambda img: np.array([[40, 40, 120, 120]], np.float32),
    )

    def box(lm):  # a fixed-size box on the landmarks' centre: the stub's 3 points are no face
        c = np.asarray(lm).mean(axis=0)
        return np.array([c[0] - box_half, c[1] - box_half, c[0] + box_half, c[1] + box_half])

    # One detection confirms a face here: these tests are about smoothing (tests/test_tracking.py
    # tests confirmation).
    kw.setdefault("confirm_hits", 1)
    return video.FaceTracker(pred, box_from_landmarks=box_from_landmarks or box, **kw)


def _track(tracker, clip):
    raw, smooth = [], []
    for i, frame in enumerate(clip):
        (face,) = tracker.update(frame, i / FPS)
        raw.append(face.raw_landmarks)
        smooth.append(face.landmarks)
    return np.asarray(raw, np.float64), np.asarray(smooth, np.float64)


def test_one_euro_passes_a_constant_and_follows_a_step():
    f = video.OneEuroFilter(min_cutoff=1.0, beta=0.0)
    x = np.array([[3.0, 4.0]])
    for i in range(5):
        np.testing.assert_allclose(f(x, i / FPS), x)
    out = [f(x + 10, (5 + i) / FPS)[0, 0] for i in range(200)]
    assert 3 < out[0] < 13 and abs(out[-1] - 13) < 1e-3  # moves toward the new value, gets there
    with pytest.raises(ValueError, match="min_cutoff"):
        video.OneEuroFilter(min_cutoff=0)


def test_smoothing_cuts_jitter_on_a_still_face_at_least_3x():
    rng = np.random.default_rng(0)
    photo = _photo()
    clip = [_noisy(photo, rng) for _ in range(60)]
    raw, smooth = _track(_tracker(detect_every=1000), clip)
    jitter_raw = np.mean(np.linalg.norm(np.diff(raw[10:], axis=0), axis=-1))
    jitter_smooth = np.mean(np.linalg.norm(np.diff(smooth[10:], axis=0), axis=-1))
    assert jitter_raw > 0.05, "the noise must move the raw landmarks for the test to mean anything"
    assert jitter_raw / jitter_smooth >= 3.0, (jitter_raw, jitter_smooth)


def test_smoothed_track_lags_a_moving_face_by_at_most_2_frames():
    rng = np.random.default_rng(1)
    photo = _photo(100)
    speed, n = 1.5, 50  # pixels per frame, constant

    def frame(i):
        canvas = np.zeros((200, 200, 3), np.uint8)
        x = int(round(20 + speed * i))
        canvas[50:150, x : x + 100] = photo
        return _noisy(canvas, rng, sigma=2.0)

    clip = [frame(i) for i in range(n)]
    whole = np.array([0.0, 0.0, 200.0, 200.0])  # the crop is the whole frame: content moves in it
    raw, smooth = _track(_tracker(detect_every=1000, box_from_landmarks=lambda lm: whole), clip)
    x_raw, x_smooth = raw[:, :, 0].mean(axis=1), smooth[:, :, 0].mean(axis=1)
    slope = np.polyfit(np.arange(n), x_raw, 1)[0]
    assert slope > 0.5 * speed, "the raw landmarks must follow the moving face"
    # The lag that best aligns the smoothed track with the raw one, after the filter settles.
    errs = {k: np.mean(np.abs(x_smooth[15 + k :] - x_raw[15 : n - k])) for k in range(8)}
    assert min(errs, key=errs.get) <= 2, errs
    # Smoothing off: the output is the raw landmarks.
    raw2, smooth2 = _track(_tracker(detect_every=1000, smoothing=False), clip[:5])
    np.testing.assert_array_equal(raw2, smooth2)


def test_detections_keep_face_ids_and_new_faces_get_new_ones():
    calls = []

    def detector(img):
        calls.append(1)
        boxes = [[40, 40, 120, 120]]
        if len(calls) > 2:
            boxes.append([0, 0, 30, 30])  # a second face appears
        return np.asarray(boxes, np.float32)

    pred = predict.Predictor(
        {"params": {}}, PooledColour(), num_landmarks=3, input_size=64, detector=detector
    )
    tracker = video.FaceTracker(pred, detect_every=3, min_score=-1e9, confirm_hits=1)
    photo = _photo()
    ids = [sorted(f.id for f in tracker.update(photo, i / FPS)) for i in range(9)]
    assert len(calls) == 3  # frames 0, 3, 6
    assert ids[:6] == [[0]] * 6 and ids[6:] == [[0, 1]] * 3


def _write_clip(path, frames_rgb, fourcc="MJPG"):
    h, w = frames_rgb[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), FPS, (w, h))
    assert writer.isOpened()
    for f in frames_rgb:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


def _moving_turning_clip(n=24, size=256):
    img = skdata.astronaut()
    out = []
    for i in range(n):
        angle = 12 * np.sin(2 * np.pi * i / n)  # turning
        m = cv2.getRotationMatrix2D((256, 180), angle, 1.0)
        m[0, 2] += 3 * i - 36  # moving
        frame = cv2.warpAffine(img, m, (512, 512), borderMode=cv2.BORDER_REFLECT)
        out.append(cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny trained heatmap student (2 steps): the CLI path, not accuracy, is under test."""
    return helpers.tiny_student_workdir(str(tmp_path_factory.mktemp("video_student")))


def test_cli_tracks_a_real_photo_through_a_clip(workdir, tmp_path, capsys):
    clip = str(tmp_path / "clip.avi")
    frames = _moving_turning_clip()
    _write_clip(clip, frames)
    out_video, out_json = str(tmp_path / "out.avi"), str(tmp_path / "landmarks.jsonl")
    # The 2-step model's heatmap peaks are near 0: --min_score -1 keeps them from counting as
    # lost tracks (a trained model's peaks are near 1).
    status = predict.main(
        [
            "--workdir",
            workdir,
            "--which",
            "latest",
            clip,
            "--draw",
            out_video,
            "-o",
            out_json,
            "--detect_every",
            "6",
            "--min_score",
            "-1",
        ]
    )
    assert status == 0, capsys.readouterr().err
    with open(out_json) as f:
        lines = [json.loads(x) for x in f]
    assert [r["frame"] for r in lines] == list(range(len(frames)))
    # Confirmed by its third detection (frames 0, 1, 2), then one id in every frame.
    assert all(0 in [f["id"] for f in r["faces"]] for r in lines[2:]), "one id, every frame"
    assert not lines[0]["faces"] and not lines[1]["faces"]
    # Rounds at frames 0, 1, 2, then every 6 frames: 8, 14, 20.
    assert sum(f["detected"] for r in lines for f in r["faces"] if f["id"] == 0) == 4
    assert len(lines[2]["faces"][0]["landmarks"]) == 68
    cap = cv2.VideoCapture(out_video)
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == len(frames)
    cap.release()
    assert "frames/s" in capsys.readouterr().err


def test_bad_videos_cameras_and_codecs_are_clear_errors(workdir, tmp_path, capsys):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    for path in (garbage, empty, tmp_path / "missing.mp4"):
        with pytest.raises(video.VideoError, match=path.name):
            video.run(_tracker(), str(path), progress=None)
    with pytest.raises(video.VideoError, match="camera 97"):
        video.open_capture(97)
    with pytest.raises(video.VideoError, match="must end in"):
        video.open_writer(str(tmp_path / "out.xyz"), FPS, 64, 64)
    # Through the CLI: one ERROR line and status 1.
    assert predict.main(["--workdir", workdir, "--camera", "97"]) == 1
    assert "ERROR: camera 97" in capsys.readouterr().err


def test_a_truncated_video_keeps_the_frames_read(tmp_path):
    clip = tmp_path / "clip.avi"
    _write_clip(str(clip), [_photo(128)] * 20)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(clip.read_bytes()[: int(clip.stat().st_size * 0.6)])
    out = tmp_path / "out.jsonl"
    with open(out, "w") as f:
        summary = video.run(_tracker(), str(cut), jsonl=f, progress=None)
    lines = out.read_text().splitlines()
    assert 0 < summary["frames"] == len(lines)
    if summary["expected_frames"] and summary["frames"] < summary["expected_frames"]:
        assert "ended after" in summary["warning"]


def test_the_drawing_thread_writes_every_frame_and_its_error_keeps_the_json(tmp_path, monkeypatch):
    """The annotated video is drawn and encoded on a thread: every frame arrives, in order;
    an encoder that fails mid-clip is one VideoError, and the JSON lines already written
    are kept (committed, not left as a partial file)."""
    clip = tmp_path / "clip.avi"
    frames = [np.full((96, 128, 3), 20 * i, np.uint8) for i in range(12)]
    _write_clip(str(clip), frames)
    out_video, out_json = tmp_path / "out.avi", tmp_path / "out.jsonl"
    summary = video.run(
        _tracker(), str(clip), draw=str(out_video), jsonl=str(out_json), progress=None
    )
    cap = cv2.VideoCapture(str(out_video))
    means = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        means.append(float(f.mean()))
    assert len(means) == summary["frames"] == 12
    assert means == sorted(means)  # brightening frames, written in order
    assert summary["draw_thread_ms_per_frame"] > 0

    real_open = video.open_writer

    class Failing:
        def __init__(self, writer):
            self.writer, self.n = writer, 0

        def write(self, frame):
            self.n += 1
            if self.n == 4:
                raise OSError("disk full")
            self.writer.write(frame)

        def release(self):
            self.writer.release()

    monkeypatch.setattr(video, "open_writer", lambda *a: Failing(real_open(*a)))
    out_json.unlink()
    with pytest.raises(video.VideoError, match="disk full"):
        video.run(_tracker(), str(clip), draw=str(out_video), jsonl=str(out_json), progress=None)
    lines = out_json.read_text().splitlines()
    assert len(lines) >= 4 and json.loads(lines[0])["frame"] == 0
