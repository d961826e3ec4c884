"""Following faces through frames: tentative and confirmed tracks, a detector that runs off the
frame's critical path, and One-Euro smoothing. `fan_jax.video` reads and writes the frames.

Tracking (`FaceTracker`): a detection starts a tentative track, output once the detector has
confirmed it in a few rounds with enough confidence; a confirmed track the detector stops
seeing is dropped. Between rounds each face is cropped from the box of its previous frame's
landmarks, so a face the detector misses for a round is still followed. Detections are
matched to tracks by box overlap, so faces keep their ids. All faces of a frame run in one
padded batch.

Smoothing: a One-Euro filter (Casiez et al., CHI 2012) per track on the landmarks: a
low-pass whose cutoff rises with speed, so a still face stops jittering and a moving one
does not lag. `min_cutoff` (Hz) sets the still-face smoothing, `beta` how fast the cutoff
rises with speed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fan_jax import geometry

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


def same_face(a: np.ndarray, b: np.ndarray, min_iou: float) -> float:
    """How well box `a` matches box `b` as one face: their IoU, or, for boxes of similar size
    (sides within 1.5x) whose centres are within 3/4 of a side, at least `min_iou` + a
    little. A face panning ~3 px/frame moves more than half a 90 px box between async rounds
    17 frames apart (measured on a loaded 2-core CPU), where the IoU falls below 0.3 and the
    face would otherwise start a second track; two faces side by side are a side or more
    apart."""
    overlap = iou(a, b)
    sa, sb = max(a[2] - a[0], a[3] - a[1]), max(b[2] - b[0], b[3] - b[1])
    if min(sa, sb) <= 0 or max(sa, sb) > 1.5 * min(sa, sb):
        return overlap
    dist = np.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2)
    if dist <= 0.75 * min(sa, sb):
        return max(overlap, min_iou + 1e-3 * (1.0 - dist / min(sa, sb)))
    return overlap


class DetectorWorker:
    """Runs the face detector on a thread of its own, so the landmark path never waits for
    it: `submit(frame, min_face)` starts a search when the worker is idle (else returns
    False) and `poll()` returns its (boxes, scores) once, when done. Whether the search
    overlaps the network depends on the detector releasing the GIL; the video benchmark
    (`benchmarks/run.py --sections video`) measures async against sync."""

    def __init__(self, detect: Callable[..., tuple[np.ndarray, np.ndarray]]):
        self._detect = detect
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fan_jax-detect")
        self._future: concurrent.futures.Future | None = None
        self.busy_s = 0.0  # time spent detecting (benchmarks)
        self.frame_index: int | None = None  # the caller's index of the frame being searched

    def _run(self, frame: np.ndarray, min_face: float | None) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        try:
            return self._detect(frame, min_face)
        finally:
            self.busy_s += time.perf_counter() - t0

    def submit(self, frame: np.ndarray, min_face: float | None, index: int | None = None) -> bool:
        if self._future is not None:
            return False
        self.frame_index = index
        # A copy: the caller may reuse its frame buffer while the search runs.
        self._future = self._pool.submit(self._run, np.array(frame), min_face)
        return True

    def poll(self, wait: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        if self._future is None or not (wait or self._future.done()):
            return None
        future, self._future = self._future, None
        return future.result()  # a detector error surfaces here, in the caller

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
    (`box_from_landmarks`; default the tight landmark box, the training crop; with
    `follow_landmarks=False`, from its last detection instead), so a face
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
        follow_landmarks: bool = True,
    ):
        self.predictor = predictor
        self.follow_landmarks = follow_landmarks
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
        self._worker = None
        if async_detect:
            # Build the detector here: importing and loading it on the worker thread, while
            # this thread runs the network, stalled its first round for seconds.
            getattr(predictor, "detector", None)
            self._worker = DetectorWorker(self.predictor.detect_scored)
        self.detections = 0  # detector rounds started (progress reports, tests)
        self.stage_s: dict[str, float] = {"detect": 0.0, "crop": 0.0, "network": 0.0, "smooth": 0.0}

    # ------------------------------------------------------------------ detection rounds

    def _min_face(self) -> float | None:
        """The smallest face this round must find (None: any size)."""
        if not self._tracks or self.detections % self.full_search_every == 0:
            return None
        boxes = [tr["detected_box"] for tr in self._tracks.values()]
        smallest = min(float(max(b[2] - b[0], b[3] - b[1])) for b in boxes)
        # Between full searches, only faces the detector finds cheaply, when the tracked
        # faces are among them: a 91 px face's half (45 px) needs dlib's upsampling, the full
        # search's cost, in every round. A smaller face needs it anyway.
        detector = getattr(self.predictor, "detector", None)
        cheap = getattr(detector, "smallest_face_without_upsampling", None)
        if isinstance(cheap, (int, float)) and cheap <= 0.9 * smallest:
            return max(0.5 * smallest, float(cheap))
        return 0.5 * smallest

    def _new_track(self, box: np.ndarray, score: float) -> None:
        self._tracks[self._next_key] = {
            "id": None,  # given at confirmation, so output ids count faces, not candidates
            "box": np.asarray(box, np.float32),
            "detected_box": np.asarray(box, np.float32),
            "filter": OneEuroFilter(**self._filter_args),
            "history": {self._frame: np.asarray(box, np.float32)},  # frame -> crop box
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

    def _apply_detections(
        self, boxes: np.ndarray, scores: np.ndarray, seen: int | None = None
    ) -> None:
        """Matches a round's boxes to tracks; `seen`: the frame the detector searched (an
        async round's is a few frames back), whose track boxes the boxes are held against."""
        order = np.argsort(-scores, kind="stable")[: self.max_faces]
        matched: dict[int, np.ndarray] = {}
        for i in order:
            box, score = boxes[i], float(scores[i])
            best, best_iou = None, self.match_iou
            for tid, tr in self._tracks.items():
                # Against where the face was last detected too (a box drawn from poor
                # landmarks must not break the face's id), and where it was on the frame
                # the detector saw.
                then = tr["history"].get(seen, tr["box"]) if seen is not None else tr["box"]
                overlap = max(
                    same_face(box, b, self.match_iou) for b in (tr["box"], tr["detected_box"], then)
                )
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
        # A tentative track asks for the next frame's round only while it can still be
        # confirmed: a weak detection (dlib's suit, ~0.3) waits for the regular rounds.
        return any(
            (not tr["confirmed"] and float(np.mean(tr["det_scores"])) >= self.confirm_score)
            or (tr["confirmed"] and tr["score"] < self.min_score)
            for tr in self._tracks.values()
        )

    def _detect(self, frame: np.ndarray) -> bool:
        """Runs (sync) or collects and starts (async) a detection round; True when this
        frame's tracks came from fresh detections."""
        t0 = time.perf_counter()
        fresh = False
        if self._worker is None:
            if self._round_due():
                boxes, scores = self.predictor.detect_scored(frame, self._min_face())
                self.detections += 1
                self._last_round = self._frame
                self._apply_detections(boxes, scores)
                fresh = True
        else:
            seen = self._worker.frame_index
            # Until a face is confirmed there is no landmark path to keep moving: wait for
            # the round (on a file read faster than real time the first rounds otherwise
            # took 40-100 frames each, and the face was first output at frame ~200).
            idle = not any(tr["confirmed"] for tr in self._tracks.values())
            done = self._worker.poll(wait=idle)
            if done is not None:
                self._apply_detections(done[0], done[1], seen)
                fresh = True
            if self._round_due() and self._worker.submit(frame, self._min_face(), self._frame):
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
        # Only confirmed faces run through the network: a tentative track keeps its detected
        # box until the detector confirms or drops it.
        ids = sorted(tid for tid, tr in self._tracks.items() if tr["confirmed"])
        if not ids:
            return []
        t0 = time.perf_counter()
        crop_boxes = {tid: self._tracks[tid]["box"].copy() for tid in ids}
        for tid in ids:
            hist = self._tracks[tid]["history"]
            hist[self._frame - 1] = crop_boxes[tid]
            for old in [k for k in hist if k < self._frame - 64]:
                del hist[old]
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
            if self.follow_landmarks:
                tr["box"] = np.asarray(self._box_from_landmarks(lm), np.float32)
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
