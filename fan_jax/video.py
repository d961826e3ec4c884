"""Landmarks on video and camera frames: tracking, One-Euro smoothing, annotated output.

    python -m fan_jax.predict --workdir=DIR clip.mp4 --draw out.mp4 -o landmarks.jsonl
    python -m fan_jax.predict --workdir=DIR --camera 0 --draw out.mp4

Tracking: the detector runs on the first frame, every `detect_every` frames, and whenever a
track's confidence (its mean per-point score, the heatmap peak) drops below `min_score`. In
between, each face is cropped from the box of its previous frame's landmarks, so a face the
frontal cascade misses (turned, tilted) is still followed. Detections are matched to tracks
by box overlap, so faces keep their ids. All faces of a frame run in one padded batch.

Smoothing: a One-Euro filter (Casiez et al., CHI 2012) per track on the landmarks: a
low-pass whose cutoff rises with speed, so a still face stops jittering and a moving one
does not lag. `min_cutoff` (Hz) sets the still-face smoothing, `beta` how fast the cutoff
rises with speed.

Output: one JSON line per frame {frame, time_s, faces: [{id, box, landmarks, scores}]},
written and flushed as frames are processed, so an error mid-clip keeps what came before.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import cv2
import numpy as np

from fan_jax import geometry, outputs
from fan_jax.errors import FanJaxError
from fan_jax.faces import Face, draw_faces

WARMUP_FRAMES = 10
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


class VideoError(FanJaxError, RuntimeError):
    """A video or camera cannot be opened or read, or an output video cannot be written."""


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


# --------------------------------------------------------------------------- smoothing


class OneEuroFilter:
    """One-Euro filter over arrays of any shape (each element filtered independently).

    `filter(x, t)` takes the raw value at time `t` (seconds) and returns the smoothed one.
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.05, d_cutoff: float = 1.0):
        if min_cutoff <= 0 or d_cutoff <= 0 or beta < 0:
            raise ValueError(
                f"One-Euro needs min_cutoff > 0, d_cutoff > 0, beta >= 0; got "
                f"{min_cutoff}, {d_cutoff}, {beta}"
            )
        self.min_cutoff, self.beta, self.d_cutoff = float(min_cutoff), float(beta), float(d_cutoff)
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t: float | None = None

    @staticmethod
    def _alpha(cutoff: Any, dt: float) -> Any:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self._x is None or self._x.shape != x.shape:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), float(t)
            return x.copy()
        assert self._t is not None  # set with self._x
        dt = max(float(t) - self._t, 1e-6)
        dx = (x - self._x) / dt
        self._dx = self._dx + self._alpha(self.d_cutoff, dt) * (dx - self._dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        self._x = self._x + self._alpha(cutoff, dt) * (x - self._x)
        self._t = float(t)
        return self._x.copy()


# --------------------------------------------------------------------------- tracking


@dataclasses.dataclass
class TrackedFace:
    id: int
    box: np.ndarray  # the box this frame's crop came from (x0, y0, x1, y1)
    landmarks: np.ndarray  # [L, 2] image pixels (smoothed when smoothing is on)
    raw_landmarks: np.ndarray  # [L, 2] before smoothing
    scores: np.ndarray  # [L]
    detected: bool  # this frame's box came from the detector

    @property
    def score(self) -> float:
        return float(np.mean(self.scores)) if len(self.scores) else 0.0

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "box": [round(float(v), 2) for v in self.box],
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "scores": [round(float(s), 4) for s in self.scores],
            "detected": self.detected,
        }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class DetectorWorker:
    """Runs the face detector on a thread of its own, so the landmark path never waits for
    it: `submit(frame, min_face)` starts a search when the worker is idle (else returns
    False) and `poll()` returns its (boxes, scores, frame index) once, when done. dlib and
    OpenCV release the GIL in their C++ loops, so the search uses the other core."""

    def __init__(self, detect: Callable[..., tuple[np.ndarray, np.ndarray]]):
        self._detect = detect
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fan_jax-detect")
        self._future: concurrent.futures.Future | None = None
        self._frame = -1
        self.busy_s = 0.0  # time spent detecting (benchmarks)

    @property
    def idle(self) -> bool:
        return self._future is None

    def _run(self, frame: np.ndarray, min_face: float | None) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        try:
            return self._detect(frame, min_face)
        finally:
            self.busy_s += time.perf_counter() - t0

    def submit(self, frame: np.ndarray, index: int, min_face: float | None) -> bool:
        if self._future is not None:
            return False
        self._frame = index
        # A copy: the caller may reuse its frame buffer while the search runs.
        self._future = self._pool.submit(self._run, np.array(frame), min_face)
        return True

    def poll(self, wait: bool = False) -> tuple[np.ndarray, np.ndarray, int] | None:
        if self._future is None or not (wait or self._future.done()):
            return None
        future, self._future = self._future, None
        boxes, scores = future.result()  # a detector error surfaces here, in the caller
        return boxes, scores, self._frame

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class FaceTracker:
    """Follows faces through frames with a `fan_jax.face_landmarks.LandmarkPipeline`.

    A detection starts a *tentative* track; it is confirmed (output and drawn) once the
    detector has matched it in `confirm_hits` rounds running with a mean detector confidence
    of at least `confirm_score` (dlib's SVM score: about 1 on a face, 0.3 on its typical false
    positive on clothing, which it fires on for many frames running). A tentative track the
    detector misses once is dropped; a confirmed one after `max_misses` rounds in a row,
    whatever its landmark scores. A face that leaves the frame is dropped that way and gets a
    new id when it comes back.

    Between rounds each face is cropped from the box of its previous landmarks
    (`box_from_landmarks`; default the tight landmark box, the training crop), so a face
    the detector misses for a round or two is still followed. Rounds run every
    `detect_every` frames, on the next frames while a track is tentative, and when a track's
    mean landmark score drops below `min_score`. With `async_detect` they run on a worker
    thread (`DetectorWorker`) and their boxes join the frame after they finish: no frame
    waits for the detector. While faces are tracked, the detector only looks for faces at
    least half the smallest one's size (dlib then skips upsampling and searches a smaller
    copy: a fraction of the cost); every `full_search_every`-th round searches everything.
    """

    def __init__(
        self,
        predictor: Any,
        *,
        detect_every: int = 10,
        min_score: float = 0.2,
        max_faces: int = 8,
        match_iou: float = 0.3,
        confirm_hits: int = 3,
        confirm_score: float = 0.6,
        max_misses: int = 3,
        async_detect: bool = False,
        full_search_every: int = 4,
        smoothing: bool = True,
        min_cutoff: float = 1.0,
        beta: float = 0.05,
        d_cutoff: float = 1.0,
        box_from_landmarks: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.predictor = predictor
        self.detect_every = max(1, int(detect_every))
        self.min_score, self.max_faces, self.match_iou = float(min_score), int(max_faces), match_iou
        self.confirm_hits, self.confirm_score = max(1, int(confirm_hits)), float(confirm_score)
        self.max_misses = max(1, int(max_misses))
        self.full_search_every = max(1, int(full_search_every))
        self.smoothing = smoothing
        self._filter_args = dict(min_cutoff=min_cutoff, beta=beta, d_cutoff=d_cutoff)
        self._box_from_landmarks = box_from_landmarks or geometry.box_from_landmarks
        self._tracks: dict[int, dict] = {}
        self._next_id = 0  # the next confirmed face's id
        self._next_key = 0  # the next track's key (tentative tracks included)
        self._frame = 0
        self._last_round = -(10**9)  # frame index of the last detection round started
        self._worker = DetectorWorker(self._detect_scored) if async_detect else None
        self.detections = 0  # detector rounds started (progress reports, tests)
        self.stage_s: dict[str, float] = {"detect": 0.0, "crop": 0.0, "network": 0.0, "smooth": 0.0}

    # ------------------------------------------------------------------ detection rounds

    def _detect_scored(
        self, frame: np.ndarray, min_face: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(self.predictor, "detect_scored"):
            return self.predictor.detect_scored(frame, min_face=min_face)
        boxes = np.asarray(self.predictor.detect(frame), np.float32).reshape(-1, 4)
        return boxes, np.ones(len(boxes), np.float32)

    def _min_face(self) -> float | None:
        """The smallest face this round must find (None: any size)."""
        if not self._tracks or self.detections % self.full_search_every == 0:
            return None
        boxes = [tr["detected_box"] for tr in self._tracks.values()]
        return 0.5 * min(float(max(b[2] - b[0], b[3] - b[1])) for b in boxes)

    def _new_track(self, box: np.ndarray, score: float) -> None:
        self._tracks[self._next_key] = {
            "id": None,  # given at confirmation, so output ids count faces, not candidates
            "box": np.asarray(box, np.float32),
            "detected_box": np.asarray(box, np.float32),
            "filter": OneEuroFilter(**self._filter_args),
            "score": 1.0,
            "hits": 1,
            "det_scores": [float(score)],
            "misses": 0,
            "confirmed": False,
        }
        self._next_key += 1
        self._confirm(self._next_key - 1)

    def _confirm(self, tid: int) -> None:
        tr = self._tracks[tid]
        if (
            not tr["confirmed"]
            and tr["hits"] >= self.confirm_hits
            and float(np.mean(tr["det_scores"])) >= self.confirm_score
        ):
            tr["confirmed"] = True
            tr["id"] = self._next_id
            self._next_id += 1

    def _apply_detections(self, boxes: np.ndarray, scores: np.ndarray) -> None:
        order = np.argsort(-scores, kind="stable")[: self.max_faces]
        matched: dict[int, np.ndarray] = {}
        for i in order:
            box, score = boxes[i], float(scores[i])
            best, best_iou = None, self.match_iou
            for tid, tr in self._tracks.items():
                # Against where the face was last detected too: a box drawn from poor
                # landmarks must not break the face's id.
                overlap = max(iou(box, tr["box"]), iou(box, tr["detected_box"]))
                if tid not in matched and overlap > best_iou:
                    best, best_iou = tid, overlap
            if best is None:
                if len(self._tracks) < self.max_faces:
                    self._new_track(box, score)
                    matched[self._next_key - 1] = box
                continue
            tr = self._tracks[best]
            tr["box"] = tr["detected_box"] = np.asarray(box, np.float32)
            tr["hits"] += 1
            tr["misses"] = 0
            tr["det_scores"] = [*tr["det_scores"], score][-self.confirm_hits :]
            self._confirm(best)
            matched[best] = box
        for tid in list(self._tracks):
            if tid in matched:
                continue
            tr = self._tracks[tid]
            tr["misses"] += 1
            if not tr["confirmed"] or tr["misses"] >= self.max_misses:
                del self._tracks[tid]

    def _round_due(self) -> bool:
        if not self._tracks or self._frame - self._last_round >= self.detect_every:
            return True
        return any(
            not tr["confirmed"] or tr["score"] < self.min_score for tr in self._tracks.values()
        )

    def _detect(self, frame: np.ndarray) -> bool:
        """Runs (sync) or collects and starts (async) a detection round; True when this
        frame's tracks came from fresh detections."""
        t0 = time.perf_counter()
        fresh = False
        if self._worker is None:
            if self._round_due():
                boxes, scores = self._detect_scored(frame, self._min_face())
                self.detections += 1
                self._last_round = self._frame
                self._apply_detections(boxes, scores)
                fresh = True
        else:
            done = self._worker.poll()
            if done is not None:
                self._apply_detections(done[0], done[1])
                fresh = True
            if self._round_due() and self._worker.submit(frame, self._frame, self._min_face()):
                self.detections += 1
                self._last_round = self._frame
        self.stage_s["detect"] += time.perf_counter() - t0
        return fresh

    @property
    def detector_busy_s(self) -> float:
        """Seconds the detector ran (on the worker thread in async mode)."""
        return self._worker.busy_s if self._worker is not None else self.stage_s["detect"]

    def close(self) -> None:
        """Stops the detector worker (async mode)."""
        if self._worker is not None:
            self._worker.close()

    # ------------------------------------------------------------------ per frame

    def update(self, frame: np.ndarray, t: float) -> list[TrackedFace]:
        """The confirmed faces of one RGB frame at time `t` (seconds)."""
        detected = self._detect(frame)
        self._frame += 1
        if not self._tracks:
            return []
        t0 = time.perf_counter()
        ids = sorted(self._tracks)
        crop_boxes = {tid: self._tracks[tid]["box"].copy() for tid in ids}
        crops, mats = [], []
        for tid in ids:
            crop, m = self.predictor.crop(frame, self._tracks[tid]["box"])
            crops.append(crop)
            mats.append(m)
        t1 = time.perf_counter()
        pts, scores = self.predictor.predict_crops(np.stack(crops))
        t2 = time.perf_counter()
        back = geometry.invert_affine(np.stack(mats))
        image_pts = geometry.apply_affine(back, pts.astype(np.float64))
        out = []
        for tid, lm, sc in zip(ids, image_pts, scores):
            tr = self._tracks[tid]
            tr["score"] = float(np.mean(sc))
            # The next crop follows the raw landmarks: smoothing is for output, not for
            # where to look.
            tr["box"] = np.asarray(self._box_from_landmarks(lm), np.float32)
            if not tr["confirmed"]:
                continue
            smoothed = tr["filter"](lm, t) if self.smoothing else lm
            out.append(
                TrackedFace(
                    id=tr["id"],
                    box=crop_boxes[tid],
                    landmarks=smoothed.astype(np.float32),
                    raw_landmarks=lm.astype(np.float32),
                    scores=np.asarray(sc),
                    detected=detected,
                )
            )
        self.stage_s["crop"] += t1 - t0
        self.stage_s["network"] += t2 - t1
        self.stage_s["smooth"] += time.perf_counter() - t2
        return out


# --------------------------------------------------------------------------- video I/O


def open_capture(source: str | int) -> tuple[cv2.VideoCapture, float, int]:
    """(capture, fps, frame count or 0 when unknown) of a file or camera index."""
    what = f"camera {source}" if isinstance(source, int) else str(source)
    if not isinstance(source, int) and not os.path.exists(source):
        raise VideoError(f"{what}: no such file")
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise VideoError(
            f"{what}: cannot be opened"
            + (
                " (is a camera attached, and free?)"
                if isinstance(source, int)
                else " (not a video, or a codec OpenCV lacks)"
            )
        )
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if not isinstance(source, int) else 0
    return cap, (fps if fps > 0 else 30.0), max(count, 0)


def open_writer(path: str, fps: float, width: int, height: int) -> cv2.VideoWriter:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FOURCC:
        raise VideoError(f"{path}: output video must end in one of {sorted(_FOURCC)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fourcc = cv2.VideoWriter_fourcc(*_FOURCC[ext])  # type: ignore[attr-defined]  # not in cv2 5 stubs
    writer = cv2.VideoWriter(path, fourcc, fps, (width, height))
    if not writer.isOpened():
        raise VideoError(
            f"{path}: OpenCV has no {_FOURCC[ext]} encoder for {ext} here; try "
            f"--draw with another extension (.avi uses MJPG)"
        )
    return writer


def frames(cap: cv2.VideoCapture) -> Iterator[np.ndarray]:
    """RGB frames until the stream ends."""
    while True:
        ok, bgr = cap.read()
        if not ok or bgr is None:
            return
        yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _progress(i: int, total: int, t0: float, stream: TextIO) -> None:
    fps = i / max(time.perf_counter() - t0, 1e-9)
    eta = f", ETA {(total - i) / fps:.0f}s" if total and fps > 0 else ""
    of = f"/{total}" if total else ""
    stream.write(f"\rframe {i}{of} | {fps:.1f} frames/s{eta}   ")
    stream.flush()


def run(
    tracker: FaceTracker,
    source: str | int,
    *,
    draw: str | None = None,
    jsonl: TextIO | str | None = None,
    max_frames: int | None = None,
    progress: TextIO | str | None = "stderr",
) -> dict:
    """Tracks faces through a video file or camera; writes the annotated video (`draw`) and
    one JSON line per frame (`jsonl`: a stream, or a path). Returns a summary.

    Output files are opened only once the first frame is read, under temporary names
    (`fan_jax.outputs`) that replace `draw` and `jsonl` at the end: an input that cannot be
    read leaves existing files as they were. When the stream ends early or an error stops it,
    the frames written so far are kept (flushed per frame) and still replace the old files."""
    # "stderr": the stream of the moment (tests and notebooks swap sys.stderr).
    report = sys.stderr if isinstance(progress, str) else progress
    cap, fps, total = open_capture(source)
    what = f"camera {source}" if isinstance(source, int) else str(source)
    writer = None
    jsonl_path = jsonl if isinstance(jsonl, str) else None
    stream = None if isinstance(jsonl, str) else jsonl
    n = faces_seen = 0
    ids: set[int] = set()
    stages = dict.fromkeys(("read", "draw", "write"), 0.0)
    t0 = time.perf_counter()
    t_warm = None  # when frame WARMUP_FRAMES started: the steady-state clock
    stream_frames = frames(cap)
    try:
        while True:
            if max_frames is not None and n >= max_frames:
                break
            if n == WARMUP_FRAMES:
                t_warm = time.perf_counter()
            tr0 = time.perf_counter()
            frame = next(stream_frames, None)
            stages["read"] += time.perf_counter() - tr0
            if frame is None:
                break
            if n == 0:
                if draw:
                    writer = open_writer(outputs.prepare(draw), fps, frame.shape[1], frame.shape[0])
                if jsonl_path is not None:
                    stream = open(outputs.prepare(jsonl_path), "w")  # noqa: SIM115 (closed below)
            t = n / fps
            faces = tracker.update(frame, t)
            faces_seen += len(faces)
            ids.update(f.id for f in faces)
            tw0 = time.perf_counter()
            if stream is not None:
                stream.write(
                    json.dumps(
                        {"frame": n, "time_s": round(t, 4), "faces": [f.to_json() for f in faces]}
                    )
                    + "\n"
                )
                stream.flush()
            tw1 = time.perf_counter()
            drawn = None
            if writer is not None:
                shown = [Face(box=f.box, landmarks=f.landmarks, scores=f.scores) for f in faces]
                drawn = cv2.cvtColor(draw_faces(frame, shown), cv2.COLOR_RGB2BGR)
            tw2 = time.perf_counter()
            if writer is not None and drawn is not None:
                writer.write(drawn)
            stages["draw"] += tw2 - tw1
            stages["write"] += (tw1 - tw0) + (time.perf_counter() - tw2)
            n += 1
            if report is not None and (n % 10 == 0 or n == total):
                _progress(n, total, t0, report)
    finally:
        t_end = time.perf_counter()
        tracker.close()
        cap.release()
        if writer is not None:
            writer.release()
        if stream is not None:
            stream.flush()
            if jsonl_path is not None:
                stream.close()
        # Whatever frames were read replace the old files; none leaves them untouched.
        for path in (draw, jsonl_path):
            if path and n > 0 and os.path.exists(outputs.partial_name(path)):
                outputs.commit(path)
            elif path:
                outputs.discard(path)
    elapsed = t_end - t0
    if report is not None:
        report.write("\n")
    if n == 0:
        raise VideoError(f"{what}: no frame could be read (empty, truncated or not a video)")
    summary: dict[str, Any] = {
        "frames": n,
        "expected_frames": total or None,
        "faces": faces_seen,
        "track_ids": sorted(ids),
        "detector_calls": tracker.detections,
        "seconds": round(elapsed, 3),
        "frames_per_s": round(n / max(elapsed, 1e-9), 2),
    }
    if t_warm is not None and n > WARMUP_FRAMES:
        # After the first frames, which compile the network for each batch size seen.
        summary["steady_frames_per_s"] = round((n - WARMUP_FRAMES) / max(t_end - t_warm, 1e-9), 2)
    per_frame = {**stages, **tracker.stage_s}
    summary["stage_ms"] = {k: round(1e3 * v / n, 3) for k, v in per_frame.items()}
    summary["detector_busy_ms_per_frame"] = round(1e3 * tracker.detector_busy_s / n, 3)
    if total and n < total and max_frames is None:
        summary["warning"] = (
            f"{what}: the stream ended after {n} of {total} frames "
            "(truncated file?); the output covers the frames read"
        )
    return summary
