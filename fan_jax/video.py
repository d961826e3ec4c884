"""Landmarks on video and camera frames: tracking, One-Euro smoothing, annotated output.

    python -m fan_jax.predict --workdir=DIR clip.mp4 --draw out.mp4 -o landmarks.jsonl
    python -m fan_jax.predict --workdir=DIR --camera 0 --draw out.mp4

Tracking and smoothing live in `fan_jax.tracking` (`FaceTracker`, re-exported here); this
module reads frames, runs the tracker on each and writes what it finds, timing each stage.

Output: one JSON line per frame {frame, time_s, faces: [{id, box, landmarks, scores}]},
written and flushed as frames are processed, so an error mid-clip keeps what came before.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import cv2
import numpy as np

from fan_jax import outputs
from fan_jax.errors import FanJaxError
from fan_jax.faces import Face, draw_faces
from fan_jax.tracking import (  # noqa: F401 (the tracker's names, where callers find them)
    DetectorWorker,
    FaceTracker,
    OneEuroFilter,
    TrackedFace,
    iou,
)

WARMUP_FRAMES = 10
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


class VideoError(FanJaxError, RuntimeError):
    """A video or camera cannot be opened or read, or an output video cannot be written."""


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


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


class DrawingWriter:
    """Draws the faces on each frame and encodes it on a thread of its own (OpenCV releases
    the GIL in both), so the landmark path does not wait ~4 ms a 640x480 frame for them.
    `put` blocks when `depth` frames are waiting (no frame is dropped) and raises an error
    the thread met; `close` writes what is queued and releases the file."""

    def __init__(self, writer: cv2.VideoWriter, path: str = "", depth: int = 4):
        import queue
        import threading

        self._writer, self.path = writer, path
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="fan_jax-draw", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain: put() must not block on a dead consumer
            t0 = time.perf_counter()
            try:
                frame, faces = item
                self._writer.write(cv2.cvtColor(draw_faces(frame, faces), cv2.COLOR_RGB2BGR))
            except BaseException as e:  # surfaced in the caller's thread
                self._error = e
            self.busy_s += time.perf_counter() - t0

    def put(self, frame: np.ndarray, faces: list[Face]) -> None:
        if self._error is not None:
            raise VideoError(f"{self.path}: writing the annotated video failed: {self._error}")
        self._queue.put((frame, faces))

    def close(self) -> BaseException | None:
        """Writes what is queued and releases the file; returns the thread's error, if any."""
        self._queue.put(None)
        self._thread.join()
        self._writer.release()
        return self._error


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
    # Compile the one- and two-face batches now: a second face must not stall a frame.
    tw = time.perf_counter()
    if hasattr(tracker.predictor, "warmup"):
        tracker.predictor.warmup((1, 2))
    warmup_s = time.perf_counter() - tw
    n = faces_seen = 0
    ids: set[int] = set()
    stages = dict.fromkeys(("read", "draw", "write"), 0.0)
    t0 = time.perf_counter()
    t_warm = None  # when frame WARMUP_FRAMES started: the steady-state clock
    t_face, n_face = None, 0  # when the first frame with a face started
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
            tf0 = time.perf_counter()
            if n == 0:
                if draw:
                    writer = DrawingWriter(
                        open_writer(outputs.prepare(draw), fps, frame.shape[1], frame.shape[0]),
                        draw,
                    )
                if jsonl_path is not None:
                    stream = open(outputs.prepare(jsonl_path), "w")  # noqa: SIM115 (closed below)
            t = n / fps
            faces = tracker.update(frame, t)
            if faces and t_face is None:
                t_face, n_face = tf0, n
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
            if writer is not None:
                # Drawn and encoded on the writer's thread; "draw" here is the wait for it.
                writer.put(
                    frame, [Face(box=f.box, landmarks=f.landmarks, scores=f.scores) for f in faces]
                )
            stages["draw"] += time.perf_counter() - tw1
            stages["write"] += tw1 - tw0
            n += 1
            if report is not None and (n % 10 == 0 or n == total):
                _progress(n, total, t0, report)
    finally:
        t_end = time.perf_counter()
        tracker.close()
        cap.release()
        draw_error = writer.close() if writer is not None else None
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
    if draw_error is not None:
        raise VideoError(f"{draw}: writing the annotated video failed: {draw_error}")
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
        "warmup_s": round(warmup_s, 3),
    }
    if t_warm is not None and n > WARMUP_FRAMES:
        # After the first frames, which compile the network for each batch size seen.
        summary["steady_frames_per_s"] = round((n - WARMUP_FRAMES) / max(t_end - t_warm, 1e-9), 2)
    if t_face is not None and n - n_face > WARMUP_FRAMES:
        # From the first frame with a face on: the rate of frames that run the network (in
        # async mode a fast file's first frames pass before the detector's first rounds).
        summary["tracked_frames_per_s"] = round((n - n_face) / max(t_end - t_face, 1e-9), 2)
        summary["first_face_frame"] = n_face
    per_frame = {**stages, **tracker.stage_s}
    summary["stage_ms"] = {k: round(1e3 * v / n, 3) for k, v in per_frame.items()}
    summary["detector_busy_ms_per_frame"] = round(1e3 * tracker.detector_busy_s / n, 3)
    if writer is not None:
        # Drawing and encoding, on the writer's thread (overlapping the landmark path).
        summary["draw_thread_ms_per_frame"] = round(1e3 * writer.busy_s / n, 3)
    if total and n < total and max_frames is None:
        summary["warning"] = (
            f"{what}: the stream ended after {n} of {total} frames "
            "(truncated file?); the output covers the frames read"
        )
    return summary


# --------------------------------------------------------------------------- the CLI


def add_video_args(parser: argparse.ArgumentParser) -> None:
    """`python -m fan_jax.predict`'s video and camera flags."""
    video_args = parser.add_argument_group("video and camera (fan_jax.video)")
    video_args.add_argument(
        "--camera",
        type=int,
        default=None,
        metavar="INDEX",
        help="read frames from this camera instead of files",
    )
    video_args.add_argument(
        "--detect_every",
        type=int,
        default=10,
        metavar="K",
        help="run the face detector every K frames (and when a track is unsure)",
    )
    video_args.add_argument(
        "--min_score",
        type=float,
        default=0.2,
        help="re-detect when a face's mean landmark score falls below this",
    )
    video_args.add_argument(
        "--detection",
        choices=("auto", "sync", "async"),
        default="auto",
        help="async: the detector runs on a worker thread and no frame waits for it (the "
        "real-time mode); sync: each round finishes on its frame (reproducible output); "
        "auto: async for --camera, sync for files",
    )
    video_args.add_argument(
        "--confirm_hits",
        type=int,
        default=3,
        metavar="N",
        help="detector rounds that must see a new face before it is output",
    )
    video_args.add_argument(
        "--confirm_score",
        type=float,
        default=0.6,
        help="mean detector confidence those rounds need (dlib: ~1 on faces, ~0.3 on false "
        "positives)",
    )
    video_args.add_argument(
        "--max_misses",
        type=int,
        default=3,
        metavar="N",
        help="drop a face the detector has missed in this many rounds running",
    )
    video_args.add_argument("--no_smooth", action="store_true", help="turn One-Euro smoothing off")
    video_args.add_argument(
        "--min_cutoff",
        type=float,
        default=1.0,
        help="One-Euro cutoff (Hz) for a still face: lower smooths more",
    )
    video_args.add_argument(
        "--beta",
        type=float,
        default=0.05,
        help="One-Euro speed coefficient: higher lags less on fast motion",
    )
    video_args.add_argument(
        "--max_frames", type=int, default=None, help="stop after this many frames"
    )


def run_cli(args: argparse.Namespace, predictor: Any) -> int:
    """Tracks the faces of `args`' video file or camera; the exit status of the CLI."""
    source = args.camera if args.camera is not None else args.images[0]
    tracker = FaceTracker(
        predictor,
        detect_every=args.detect_every,
        min_score=args.min_score,
        confirm_hits=args.confirm_hits,
        confirm_score=args.confirm_score,
        max_misses=args.max_misses,
        async_detect=args.detection == "async"
        or (args.detection == "auto" and args.camera is not None),
        smoothing=not args.no_smooth,
        min_cutoff=args.min_cutoff,
        beta=args.beta,
    )
    try:
        summary = run(
            tracker,
            source,
            draw=args.draw,
            jsonl=args.output or sys.stdout,
            max_frames=args.max_frames,
        )
    except (FanJaxError, OSError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    if "warning" in summary:
        print(f"WARNING: {summary['warning']}", file=sys.stderr)
    print(
        f"{summary['frames']} frame(s), {summary['faces']} face(s) in "
        f"{len(summary['track_ids'])} track(s), {summary['detector_calls']} detector call(s); "
        f"{summary['frames_per_s']} frames/s"
        + (
            f" ({summary['steady_frames_per_s']} after the first {WARMUP_FRAMES})"
            if "steady_frames_per_s" in summary
            else ""
        ),
        file=sys.stderr,
    )
    return 0 if summary["faces"] else 1
