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


class FaceTracker:
    """Follows faces through frames with a `fan_jax.predict.Predictor` (see the module doc).

    `box_from_landmarks` maps a face's landmarks to the box its next crop comes from; the
    default is the tight landmark box, the training crop of the 300W / COFW configs.
    """

    def __init__(
        self,
        predictor: Any,
        *,
        detect_every: int = 10,
        min_score: float = 0.2,
        max_faces: int = 8,
        match_iou: float = 0.3,
        smoothing: bool = True,
        min_cutoff: float = 1.0,
        beta: float = 0.05,
        d_cutoff: float = 1.0,
        box_from_landmarks: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.predictor = predictor
        self.detect_every = max(1, int(detect_every))
        self.min_score, self.max_faces, self.match_iou = float(min_score), int(max_faces), match_iou
        self.smoothing = smoothing
        self._filter_args = dict(min_cutoff=min_cutoff, beta=beta, d_cutoff=d_cutoff)
        self._box_from_landmarks = box_from_landmarks or geometry.box_from_landmarks
        self._tracks: dict[int, dict] = {}  # id -> {'box', 'filter', 'score'}
        self._next_id = 0
        self._frame = 0
        self.detections = 0  # detector calls (progress reports, tests)

    def _new_track(self, box: np.ndarray) -> int:
        tid = self._next_id
        self._next_id += 1
        self._tracks[tid] = {
            "box": np.asarray(box, np.float32),
            "detected_box": np.asarray(box, np.float32),
            "filter": OneEuroFilter(**self._filter_args),
            "score": 1.0,
        }
        return tid

    def _detect(self, frame: np.ndarray) -> None:
        self.detections += 1
        boxes = self.predictor.detect(frame)[: self.max_faces]
        if len(boxes) == 0:
            return  # keep following the current tracks: the cascade misses turned faces
        matched: dict[int, np.ndarray] = {}
        for box in boxes:
            best, best_iou = None, self.match_iou
            for tid, tr in self._tracks.items():
                # Against where the face was last detected too: a box drawn from poor
                # landmarks must not break the face's id.
                overlap = max(iou(box, tr["box"]), iou(box, tr["detected_box"]))
                if tid not in matched and overlap > best_iou:
                    best, best_iou = tid, overlap
            if best is None:
                best = self._new_track(box)
            matched[best] = box
        # A track the detector did not see again is dropped only when it was also unsure.
        for tid in list(self._tracks):
            if tid in matched:
                self._tracks[tid]["box"] = np.asarray(matched[tid], np.float32)
                self._tracks[tid]["detected_box"] = np.asarray(matched[tid], np.float32)
            elif self._tracks[tid]["score"] < self.min_score:
                del self._tracks[tid]

    def update(self, frame: np.ndarray, t: float) -> list[TrackedFace]:
        """The faces of one RGB frame at time `t` (seconds)."""
        unsure = any(tr["score"] < self.min_score for tr in self._tracks.values())
        detected = not self._tracks or unsure or self._frame % self.detect_every == 0
        if detected:
            self._detect(frame)
        self._frame += 1
        if not self._tracks:
            return []
        ids = sorted(self._tracks)
        crops, mats = [], []
        for tid in ids:
            crop, m = self.predictor.crop(frame, self._tracks[tid]["box"])
            crops.append(crop)
            mats.append(m)
        pts, scores = self.predictor.predict_crops(np.stack(crops))
        back = geometry.invert_affine(np.stack(mats))
        image_pts = geometry.apply_affine(back, pts.astype(np.float64))
        out = []
        for tid, lm, sc in zip(ids, image_pts, scores):
            tr = self._tracks[tid]
            smoothed = tr["filter"](lm, t) if self.smoothing else lm
            out.append(
                TrackedFace(
                    id=tid,
                    box=tr["box"].copy(),
                    landmarks=smoothed.astype(np.float32),
                    raw_landmarks=lm.astype(np.float32),
                    scores=np.asarray(sc),
                    detected=detected,
                )
            )
            tr["score"] = float(np.mean(sc))
            # The next crop follows the raw landmarks: smoothing is for output, not for
            # where to look.
            tr["box"] = np.asarray(self._box_from_landmarks(lm), np.float32)
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
    t0 = time.perf_counter()
    try:
        for frame in frames(cap):
            if max_frames is not None and n >= max_frames:
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
            if stream is not None:
                stream.write(
                    json.dumps(
                        {"frame": n, "time_s": round(t, 4), "faces": [f.to_json() for f in faces]}
                    )
                    + "\n"
                )
                stream.flush()
            if writer is not None:
                shown = [Face(box=f.box, landmarks=f.landmarks, scores=f.scores) for f in faces]
                writer.write(cv2.cvtColor(draw_faces(frame, shown), cv2.COLOR_RGB2BGR))
            n += 1
            if report is not None and (n % 10 == 0 or n == total):
                _progress(n, total, t0, report)
    finally:
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
    elapsed = time.perf_counter() - t0
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
    if total and n < total and max_frames is None:
        summary["warning"] = (
            f"{what}: the stream ended after {n} of {total} frames "
            "(truncated file?); the output covers the frames read"
        )
    return summary
