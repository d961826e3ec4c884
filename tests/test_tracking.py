"""Tracks that are faces: clips made from real photos through `python -m fan_jax.predict`,
with dlib's detector (the one that fires on the astronaut's suit for many frames running).

One face gives one id over 60 frames, two faces side by side two stable ids, a clip with no
face none, and a face that leaves the frame is dropped and comes back under a new id. The
detector-side logic (confirmation, misses, the smaller search) is unit-tested with scripted
detections."""

import json
import os
import sys

import cv2
import matplotlib.cbook
import matplotlib.image
import numpy as np
import pytest
from skimage import data as skdata

from fan_jax import detect, predict, video

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers

pytest.importorskip("dlib")
FPS = 30.0


def _one_face(n=60, pan=2.0):
    """The astronaut, rotating +-10 degrees and panning `pan` px a frame (the issue's clip)."""
    img = skdata.astronaut()
    out = []
    for i in range(n):
        m = cv2.getRotationMatrix2D((256, 180), 10 * np.sin(2 * np.pi * i / 30), 1.0)
        m[0, 2] += pan * i - 60
        out.append(cv2.warpAffine(img, m, (512, 512), borderMode=cv2.BORDER_REFLECT))
    return out


def _hopper():
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        img = np.asarray(matplotlib.image.imread(f))
    return cv2.resize(img, (437, 512), interpolation=cv2.INTER_AREA)


def _two_faces(n=60):
    right = _hopper()
    out = []
    for i, left in enumerate(_one_face(n, pan=1.0)):
        m = np.float32([[1, 0, 2 * np.sin(2 * np.pi * i / 20)], [0, 1, 0]])
        out.append(np.concatenate([left, cv2.warpAffine(right, m, (437, 512))], axis=1))
    return out


def _no_face(n=60):
    img = skdata.coffee()
    h, w = img.shape[:2]
    return [
        cv2.warpAffine(img, np.float32([[1, 0, 2 * i - 60], [0, 1, 0]]), (w, h)) for i in range(n)
    ]


def _leaves_and_returns():
    """The face pans out of the frame to the right, stays out, and pans back."""
    img = skdata.astronaut()
    shifts = [*range(0, 420, 20), *[420] * 20, *range(420, -20, -20)]
    frames = []
    for dx in shifts:
        m = np.float32([[1, 0, dx], [0, 1, 0]])
        frames.append(cv2.warpAffine(img, m, (512, 512)))
    return frames, shifts


def _write_clip(path, frames_rgb):
    h, w = frames_rgb[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), FPS, (w, h))
    assert writer.isOpened()
    for f in frames_rgb:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return helpers.tiny_student_workdir(str(tmp_path_factory.mktemp("tracking_student")))


def _cli(workdir, tmp_path, frames, *extra):
    clip = str(tmp_path / "clip.avi")
    _write_clip(clip, frames)
    out = tmp_path / "out.jsonl"
    # The 2-step model's heatmap peaks are near 0: --min_score -1 keeps them from asking for a
    # detection round every frame (a trained model's peaks are near 1).
    argv = ["--workdir", workdir, "--which", "latest", clip, "-o", str(out), "--min_score", "-1"]
    status = predict.main([*argv, "--detector", "dlib", *extra])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["frame"] for r in lines] == list(range(len(frames)))
    return status, [[f["id"] for f in r["faces"]] for r in lines], lines


def test_one_face_gives_one_id_over_60_frames(workdir, tmp_path):
    status, ids, lines = _cli(workdir, tmp_path, _one_face())
    assert status == 0
    assert {i for frame in ids for i in frame} == {0}
    # Confirmed at its third detection (frames 0, 1, 2), then followed in every frame.
    assert ids[:2] == [[], []] and all(frame == [0] for frame in ids[2:])
    face = lines[30]["faces"][0]
    assert 100 < face["box"][0] < 260 and face["box"][1] < 200  # the face, not the suit


def test_two_faces_side_by_side_give_two_stable_ids(workdir, tmp_path):
    status, ids, lines = _cli(workdir, tmp_path, _two_faces())
    assert status == 0
    assert all(sorted(frame) == [0, 1] for frame in ids[2:]), ids
    xs = {f["id"]: f["box"][0] for f in lines[-1]["faces"]}
    first = {f["id"]: f["box"][0] for f in lines[2]["faces"]}
    assert (xs[0] < 512) == (first[0] < 512)  # each id stays on its own face


def test_a_clip_without_a_face_gives_no_id(workdir, tmp_path):
    status, ids, _ = _cli(workdir, tmp_path, _no_face())
    assert status == 1  # no face anywhere, as for a photo without one
    assert all(frame == [] for frame in ids)


def test_a_face_that_leaves_is_dropped_and_returns_with_a_new_id(workdir, tmp_path):
    frames, shifts = _leaves_and_returns()
    status, ids, _ = _cli(workdir, tmp_path, frames, "--detect_every", "2")
    assert status == 0
    out = [i for i, dx in enumerate(shifts) if dx >= 420]
    back = len(shifts) - 1
    assert 0 in ids[5] and ids[back] and 0 not in ids[back], ids
    assert ids[out[-1]] == [], "dropped while it was out of the frame"
    assert {i for frame in ids for i in frame} == {0, 1}


# ----------------------------------------------------------------- scripted detections


class Scripted:
    """A 'detector' that returns the boxes and scores a test scripts for each round."""

    def __init__(self, rounds):
        self.rounds, self.calls, self.min_faces = list(rounds), 0, []

    def scored(self, image, min_face=None):
        self.min_faces.append(min_face)
        boxes, scores = self.rounds[min(self.calls, len(self.rounds) - 1)]
        self.calls += 1
        return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32)

    def __call__(self, image):
        return self.scored(image)[0]


class Crops:
    """Stands in for the pipeline: crops and 'landmarks' at the crop's corners."""

    def __init__(self, detector):
        self.detector = detector

    def detect_scored(self, image, min_face=None):
        return detect.scored_detections(self.detector, image, min_face)

    def crop(self, image, box):
        b = np.asarray(box, np.float64)
        s = 32 / (b[2] - b[0])
        m = np.array([[s, 0, -s * b[0]], [0, s, -s * b[1]]])
        return np.zeros((32, 32, 3), np.uint8), m

    def predict_crops(self, crops):
        pts = np.tile(np.array([[0.0, 0.0], [31.0, 31.0]]), (len(crops), 1, 1))
        return pts, np.ones((len(crops), 2), np.float32)


FACE = [100, 100, 200, 200]
ELSEWHERE = [300, 300, 360, 360]


def _ids(tracker, n):
    frame = np.zeros((480, 640, 3), np.uint8)
    return [sorted(f.id for f in tracker.update(frame, i / FPS)) for i in range(n)]


def test_a_weak_detection_seen_many_times_is_never_output():
    # A false positive that comes back every round with a low score, beside a real face.
    det = Scripted([([FACE, ELSEWHERE], [1.1, 0.3])] * 20)
    tracker = video.FaceTracker(Crops(det), detect_every=2, smoothing=False)
    assert {i for frame in _ids(tracker, 20) for i in frame} == {0}


def test_confirmation_and_misses():
    rounds = [([FACE], [1.0])] * 3 + [([], [])] * 3 + [([FACE], [1.0])] * 4
    tracker = video.FaceTracker(
        Crops(Scripted(rounds)), detect_every=1, smoothing=False, max_misses=3
    )
    ids = _ids(tracker, 10)
    assert ids[:2] == [[], []] and ids[2:5] == [[0]] * 3  # confirmed at the 3rd hit
    assert ids[5] == []  # 3rd miss running: dropped
    assert ids[8:] == [[1]] * 2  # back as a new track, confirmed after 3 hits


def test_tracked_faces_narrow_the_search_and_every_4th_round_is_full():
    det = Scripted([([FACE], [1.0])] * 30)
    tracker = video.FaceTracker(Crops(det), detect_every=1, smoothing=False)
    _ids(tracker, 9)
    assert det.min_faces[0] is None and det.min_faces[4] is None and det.min_faces[8] is None
    assert det.min_faces[1] == pytest.approx(50.0)  # half the tracked face's side


def test_between_full_searches_the_search_never_asks_for_upsampling():
    """dlib finds faces under ~80 px only by upsampling, the full search's cost: between
    full searches the tracker asks for no smaller face than that, even for a small face."""

    class Dlibish(Scripted):
        smallest_face_without_upsampling = 80.0

    det = Dlibish([([FACE], [1.0])] * 30)  # a 100 px face: half of it is 50 px
    tracker = video.FaceTracker(Crops(det), detect_every=1, smoothing=False)
    _ids(tracker, 9)
    assert det.min_faces[0] is None and det.min_faces[4] is None
    assert det.min_faces[1] == det.min_faces[2] == pytest.approx(80.0)
    # A face smaller than that needs the upsampled search to be found again: half its side.
    small = Dlibish([([[100, 100, 160, 160]], [1.0])] * 30)
    tracker = video.FaceTracker(Crops(small), detect_every=1, smoothing=False)
    _ids(tracker, 4)
    assert small.min_faces[1] == pytest.approx(30.0)
    real = detect.DlibDetector()
    native = real.smallest_face_without_upsampling / real.CALIBRATIONS[0].scale
    assert 1.1 * real.MIN_FACE_UPSAMPLE_0 / native <= 1.0  # scored() then skips upsampling


def test_async_detection_waits_only_until_a_face_is_confirmed(tmp_path):
    """No face yet: each frame waits for its round (nothing to keep moving, and the face is
    confirmed by the 3rd frame as in sync mode). Then a stuck detector stalls no frame: the
    face goes on being tracked, and a round's boxes join a later frame."""
    import threading
    import time

    gate = threading.Event()
    gate.set()

    class Gated(Scripted):
        def scored(self, image, min_face=None):
            gate.wait(5)
            return super().scored(image, min_face)

    det = Gated([([FACE], [1.0])] * 50)
    tracker = video.FaceTracker(Crops(det), detect_every=1, smoothing=False, async_detect=True)
    frame = np.zeros((480, 640, 3), np.uint8)
    ids = [[f.id for f in tracker.update(frame, i / FPS)] for i in range(4)]
    assert ids[:3] == [[], [], [0]] or ids[:4] == [[], [], [], [0]], ids
    gate.clear()  # the detector is stuck from here on
    t0 = time.perf_counter()
    stuck = [[f.id for f in tracker.update(frame, (4 + i) / FPS)] for i in range(5)]
    assert time.perf_counter() - t0 < 2.0  # no frame waited for the 5 s gate
    assert stuck == [[0]] * 5
    calls = det.calls
    gate.set()
    for i in range(200):
        tracker.update(frame, (9 + i) / FPS)
        if det.calls > calls + 1:
            break
        threading.Event().wait(0.002)
    tracker.close()
    assert det.calls > calls + 1


def test_a_face_that_moves_half_its_box_between_async_rounds_keeps_its_id():
    """An async round's box lands frames after the frame it searched; a face panning fast
    has moved most of half its side by then (IoU ~0.25): still the same face, not a new id."""
    moved = [160, 100, 260, 200]  # 60 px right of FACE, the same size
    assert video.iou(np.array(FACE, float), np.array(moved, float)) < 0.3
    rounds = [([FACE], [1.0])] * 3 + [([moved], [1.0])] * 6
    tracker = video.FaceTracker(
        Crops(Scripted(rounds)), detect_every=1, smoothing=False, follow_landmarks=False
    )
    ids = _ids(tracker, 9)
    assert ids[2:] == [[0]] * 7
    # Two faces side by side (a side apart) stay two.
    beside = [([FACE, [210, 100, 310, 200]], [1.0, 1.0])] * 5
    tracker = video.FaceTracker(Crops(Scripted(beside)), detect_every=1, smoothing=False)
    assert _ids(tracker, 5)[-1] == [0, 1]


def test_dlib_small_search_finds_the_large_face_faster_than_the_full_one():
    img = np.ascontiguousarray(skdata.astronaut())
    det = detect.DlibDetector()
    full, full_scores = det.scored(img)
    small, small_scores = det.scored(img, min_face=0.5 * (full[0, 2] - full[0, 0]))
    assert len(full) >= 1 and len(small) >= 1
    assert video.iou(full[0], small[0]) > 0.6
    assert full_scores[0] > 0.6 and small_scores[0] > 0.6


def test_follow_landmarks_false_holds_the_crop_on_the_detection():
    det = Scripted([([FACE], [1.0])] * 10)
    boxes = {}
    for follow in (True, False):
        tracker = video.FaceTracker(
            Crops(det), detect_every=100, smoothing=False, follow_landmarks=follow, confirm_hits=1
        )
        frame = np.zeros((480, 640, 3), np.uint8)
        faces = [tracker.update(frame, i / FPS) for i in range(3)]
        boxes[follow] = faces[-1][0].box
    np.testing.assert_allclose(boxes[False], FACE)
    # Crops' corner 'landmarks' give the box they span (geometry.box_from_landmarks), not FACE.
    assert not np.allclose(boxes[True], FACE)
