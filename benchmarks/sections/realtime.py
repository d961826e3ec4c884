"""The real-time CPU path's video frames/s (its batch-1 latency: `benchmarks.sections.e2e`).

``video``: a 640x480 clip of one real face (skimage's astronaut, turning and panning) through
`fan_jax.video.run` with the detector on its worker thread, drawing and writing the annotated
video and the JSON lines: steady-state frames/s and ms per stage.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from benchmarks.harness import Config, Json, fmt, section

# --------------------------------------------------------------------------------------------
# video
# --------------------------------------------------------------------------------------------


def face_clip_640x480(n: int) -> list[np.ndarray]:
    """One real face (skimage's astronaut) in a 640x480 frame, turning +-10 degrees and panning."""
    import cv2
    from skimage import data as skdata

    img = skdata.astronaut()
    frames = []
    for i in range(n):
        m = cv2.getRotationMatrix2D((256, 180), 10 * np.sin(2 * np.pi * i / 60), 1.0)
        m[0, 2] += 60 + 40 * np.sin(2 * np.pi * i / 90)
        m[1, 2] -= 20
        frames.append(cv2.warpAffine(img, m, (640, 480), borderMode=cv2.BORDER_REFLECT))
    return frames


def video_worker(args: Json) -> Json:
    """In a fresh process (as `python -m fan_jax.video` runs): one mode's run of the clip."""
    from benchmarks.jax_runners import init_variables
    from fan_jax import predict, video
    from fan_jax.models import fan

    size, L, mode = args["image_size"], args["num_landmarks"], args["mode"]
    variables = init_variables(L, size, seed=0)
    p = predict.Predictor(variables, fan.mobilefan(L), L, size, detector="auto")
    p.set_precision("auto")
    # Random weights give no face-shaped landmarks, so a crop box following them would
    # wander; a box held on the detection keeps the work per frame a real face's.
    tracker = video.FaceTracker(
        p, async_detect=mode == "async", follow_landmarks=False, min_score=-1.0
    )
    tmp = args["tmp"]
    summary = video.run(
        tracker,
        args["clip"],
        draw=os.path.join(tmp, f"out_{mode}.avi"),
        jsonl=os.path.join(tmp, f"out_{mode}.jsonl"),
        progress=None,
    )
    summary["precision"] = p.precision
    return summary


@section("video")
def video_section(cfg: Config) -> Json:
    """Frames/s on a 640x480 one-face clip (detector on its worker thread, drawing and writing), and ms per stage."""
    import cv2

    from benchmarks.harness import run_in_process

    size, L = cfg.image_size, cfg.num_landmarks
    # Long enough that the async run tracks the face for most of it: on a file read faster
    # than real time, its first detection rounds take a few hundred frames to confirm it.
    n = 40 if cfg.quick else 900
    frames = face_clip_640x480(n)
    out: Json = {"frames": n, "frame_size": [640, 480], "image_size": size}
    with tempfile.TemporaryDirectory() as tmp:
        clip = os.path.join(tmp, "clip.avi")
        writer = cv2.VideoWriter(clip, cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (640, 480))
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        writer.release()
        results = {}
        # Each mode in its own process, started as the video CLI starts: in this process the
        # earlier sections' runtimes (TFLite, onnxruntime, torch) keep their thread pools and
        # the training malloc tunables are on (`benchmarks.harness.run_in_process`).
        for mode in ("async", "sync"):
            args = dict(image_size=size, num_landmarks=L, mode=mode, clip=clip, tmp=tmp)
            results[mode] = run_in_process(
                "benchmarks.sections.realtime", "video_worker", args, f"video ({mode})"
            )
    out.update(results)
    out["process"] = "one per mode, glibc malloc as the video CLI runs it"
    # From the first frame with the face on (until then a fast file's frames skip the network).
    fps = results["async"].get("tracked_frames_per_s", 0.0)
    out["summary"] = {"video_frames_per_s": fps}
    stage = results["async"]["stage_ms"]
    out["rows"] = [
        (
            "video frames/s (640x480, one face, detector on a worker thread; sync in baseline)",
            fmt(fps),
            fmt(results["sync"].get("tracked_frames_per_s")),
            fmt(fps / max(results["sync"].get("tracked_frames_per_s", 1e-9), 1e-9), "x"),
            " ".join(f"{k} {v:.2f}" for k, v in stage.items()),
        )
    ]
    return out
