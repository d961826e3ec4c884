"""The real-time CPU path: batch-1 end-to-end latency against every runtime, and video frames/s.

``e2e``: one uint8 face crop in, its landmarks in image pixels out (network, heatmap decode and
the crop-to-image map), for fan_jax (`fan_jax.predict.Predictor.predict_crops`, float32 and
bf16 matmuls) and, in the same interleaved loop, each peer on the same weights: TFLite float32
(XNNPACK), onnxruntime and OpenVINO (float32 and bf16 precision hints) on the exported files,
and PyTorch eager (float32 and bf16 autocast) on its twin of the network (its own random
weights: latency does not depend on them). The decode's share is
the full call minus the network alone.

``video``: a 640x480 clip of one real face (skimage's astronaut, turning and panning) through
`fan_jax.video.run` with the detector on its worker thread, drawing and writing the annotated
video and the JSON lines: steady-state frames/s and ms per stage.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.harness import Config, Json, fmt, latency_stats, section, time_interleaved


def _torch_decode(torch: Any, hm: Any) -> Any:
    """argmax + quarter-pixel shift (REFERENCE section 4) on NCHW heatmaps, in crop pixels."""
    b, n, h, w = hm.shape
    flat = hm.reshape(b, n, h * w)
    idx = flat.argmax(-1)
    x, y = idx % w, idx // w

    def at(yy: Any, xx: Any) -> Any:
        j = yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)
        return flat.gather(-1, j[..., None])[..., 0]

    sx = torch.sign(at(y, x + 1) - at(y, x - 1)) * ((x > 0) & (x < w - 1))
    sy = torch.sign(at(y + 1, x) - at(y - 1, x)) * ((y > 0) & (y < h - 1))
    pts = torch.stack([x + 0.25 * sx, y + 0.25 * sy], -1).float()
    return (pts + 0.5) * 4.0 - 0.5


def _to_image(pts: np.ndarray, back: np.ndarray) -> np.ndarray:
    from fan_jax import geometry

    return geometry.apply_affine(back, np.asarray(pts, np.float64))


@section("e2e")
def e2e_section(cfg: Config) -> Json:
    """Batch-1 crop-to-image-landmarks latency: fan_jax against TFLite, onnxruntime, OpenVINO and PyTorch eager."""
    import jax

    from benchmarks.jax_runners import init_variables
    from fan_jax import geometry, precision, predict
    from fan_jax.models import fan

    size, L = cfg.image_size, cfg.num_landmarks
    iters = cfg.export_iters_per_repeat
    model = fan.mobilefan(L)
    variables = init_variables(L, size, seed=0)
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    # The crop of a 640x480 frame's face box, mapped back to the frame.
    m = geometry.crop_transform(np.array([200.0, 120.0, 380.0, 300.0]), size, 1.25)
    back = geometry.invert_affine(m[None])
    out: Json = {"batch": 1, "image_size": size, "iters_per_repeat": iters}
    out["cpu_bf16_units"] = precision.bf16_units()

    fns: dict[str, Callable[[], Any]] = {}
    runners: dict[str, Callable[[], np.ndarray]] = {}
    for prec in ("float32", "bfloat16"):
        p = predict.Predictor(variables, model, L, size, detector=lambda im: np.zeros((0, 4)))
        p.set_precision(prec)
        runners[f"fan_jax_{prec}"] = functools.partial(
            lambda p: _to_image(p.predict_crops(crop)[0], back), p
        )
    net = jax.jit(p.network_fn())
    runners["fan_jax_network_only"] = lambda: np.asarray(net(p.variables, crop))
    # The decode alone, on this network's heatmaps: its share of the network's time.
    from fan_jax import landmarks

    hm = jax.device_put(net(p.variables, crop))
    decode = jax.jit(lambda h: landmarks.decode("heatmap", h, size))
    runners["fan_jax_decode_only"] = lambda: np.asarray(decode(hm)[0])

    notes: Json = {}
    with tempfile.TemporaryDirectory() as tmp:
        _add_exported_peers(model, variables, size, crop, back, tmp, runners, notes)
        _add_torch_peers(cfg, L, size, crop, back, runners, notes)
        # The exported peers run the same weights: their landmarks should be ours.
        ref = runners["fan_jax_float32"]()
        out["median_px_vs_fan_jax"] = {
            name: float(np.median(np.abs(run() - ref)))
            for name, run in runners.items()
            if not name.startswith(("fan_jax_", "torch_"))
        }
        for name, run in runners.items():
            fns[name] = functools.partial(lambda r: [r() for _ in range(iters)], run)
        times = time_interleaved(fns, cfg.repeats, cfg.warmup)
    stats = {name: latency_stats(t, iters) for name, t in times.items()}
    out["runtimes"] = stats
    out["notes"] = notes
    ours = {
        k: v["latency_ms"] for k, v in stats.items() if k.startswith("fan_jax_") and "only" not in k
    }
    best_ours = min(ours, key=ours.get)
    e2e = ours[best_ours]
    net_ms = stats["fan_jax_network_only"]["latency_ms"]
    decode_ms = stats["fan_jax_decode_only"]["latency_ms"]
    peers = {k: v["latency_ms"] for k, v in stats.items() if not k.startswith("fan_jax_")}
    out.update(
        fan_jax_precision=best_ours.removeprefix("fan_jax_"),
        # The network returning its heatmaps to the host (1.6 MB at 256 px, 98 points).
        network_ms=net_ms,
        decode_ms=decode_ms,
        decode_fraction_of_network=decode_ms / net_ms,
    )
    out["summary"] = {
        "e2e_latency_ms": e2e,
        "e2e_peer_latency_ms": peers,
        "e2e_ahead_of_every_peer": bool(peers) and all(e2e < v for v in peers.values()),
    }
    out["rows"] = [
        (
            f"e2e ms (batch 1, {size}px crop -> image landmarks), fan_jax {out['fan_jax_precision']}"
            f" vs {peer}",
            fmt(e2e),
            fmt(ms),
            fmt(ms / e2e, "x"),
            f"{100 * stats[best_ours]['spread']:.0f}% / {100 * stats[peer]['spread']:.0f}%",
        )
        for peer, ms in peers.items()
    ]
    return out


def _add_exported_peers(
    model: Any,
    variables: Any,
    size: int,
    crop: np.ndarray,
    back: np.ndarray,
    tmp: str,
    runners: dict[str, Callable[[], np.ndarray]],
    notes: Json,
) -> None:
    from fan_jax.export import export
    from fan_jax.exported import load_exported

    x = crop.astype(np.float32)
    have = {m: importlib.util.find_spec(m) is not None for m in ("ai_edge_litert", "onnxruntime")}
    have["jax2onnx"] = importlib.util.find_spec("jax2onnx") is not None
    have["openvino"] = importlib.util.find_spec("openvino") is not None
    if have["ai_edge_litert"]:
        path = export(model, variables, size, "tflite", os.path.join(tmp, "m.tflite"))
        rt = load_exported(path)
        runners["tflite_float32"] = lambda: _to_image(rt(x)["landmarks"], back)
    else:
        notes["tflite"] = "skipped: pip install 'fan_jax[export]'"
    if not have["jax2onnx"]:
        notes["onnx"] = "skipped: pip install 'fan_jax[export]'"
        return
    onnx_path = export(model, variables, size, "onnx", os.path.join(tmp, "m.onnx"))
    if have["onnxruntime"]:
        ort_rt = load_exported(onnx_path)
        runners["onnxruntime"] = lambda: _to_image(ort_rt(x)["landmarks"], back)
    if not have["openvino"]:
        notes["openvino"] = "skipped: pip install 'fan_jax[bench]' (the openvino wheel)"
        return
    import openvino as ov

    core = ov.Core()
    ov_model = core.read_model(onnx_path)
    for hint, name in (("f32", "openvino_float32"), ("bf16", "openvino_bf16")):
        compiled = core.compile_model(
            ov_model,
            "CPU",
            {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"},
        )
        request = compiled.create_infer_request()
        lm_port = next(o for o in compiled.outputs if "landmarks" in o.get_names())

        def run(request: Any = request, port: Any = lm_port) -> np.ndarray:
            res = request.infer({0: x})
            return _to_image(res[port], back)

        runners[name] = run
        notes[name] = {"precision_hint": hint}


def _add_torch_peers(
    cfg: Config,
    num_landmarks: int,
    size: int,
    crop: np.ndarray,
    back: np.ndarray,
    runners: dict[str, Callable[[], np.ndarray]],
    notes: Json,
) -> None:
    from benchmarks import harness

    torch = harness.load_torch()
    if torch is None:
        notes["torch"] = "skipped: pip install 'fan_jax[bench]'"
        return
    from benchmarks import torch_mobilefan
    from fan_jax import landmarks

    threads = cfg.torch_threads or harness.core_count()
    torch.set_num_threads(threads)
    model = torch_mobilefan.TorchMobileFAN(num_landmarks).eval()
    model = model.to(memory_format=torch.channels_last)
    notes["torch"] = {"threads": threads, "memory_format": "channels_last"}

    def run(bf16: bool) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(landmarks.normalize_np(crop)).permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=torch.channels_last)
            if bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    hm, _ = model(x)
            else:
                hm, _ = model(x)
            pts = _torch_decode(torch, hm.float())
        return _to_image(pts.numpy(), back)

    runners["torch_eager_float32"] = functools.partial(run, False)
    runners["torch_eager_bf16_autocast"] = functools.partial(run, True)


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


@section("video")
def video_section(cfg: Config) -> Json:
    """Frames/s on a 640x480 one-face clip (detector on its worker thread, drawing and writing), and ms per stage."""
    import cv2

    from benchmarks.jax_runners import init_variables
    from fan_jax import predict, video
    from fan_jax.models import fan

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
        variables = init_variables(L, size, seed=0)
        results = {}
        for mode in ("async", "sync"):
            p = predict.Predictor(variables, fan.mobilefan(L), L, size, detector="auto")
            p.set_precision("auto")
            # Random weights give no face-shaped landmarks, so a crop box following them would
            # wander; a box held on the detection keeps the work per frame a real face's.
            tracker = video.FaceTracker(
                p, async_detect=mode == "async", follow_landmarks=False, min_score=-1.0
            )
            summary = video.run(
                tracker,
                clip,
                draw=os.path.join(tmp, f"out_{mode}.avi"),
                jsonl=os.path.join(tmp, f"out_{mode}.jsonl"),
                progress=None,
            )
            summary["precision"] = p.precision
            results[mode] = summary
    out.update(results)
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
