"""Batch-1 end-to-end latency: one uint8 face crop in, its landmarks in image pixels out.

    python benchmarks/run.py --sections e2e

fan_jax (`fan_jax.predict.Predictor.predict_crops`: network, heatmap decode, crop-to-image
map; float32, and bf16 matmuls) against each peer on the same weights: TFLite float32
(XNNPACK), onnxruntime and OpenVINO (float32 and bf16 precision hints) on the exported files,
and PyTorch eager (float32 and bf16 autocast) on its twin of the network (its own random
weights: latency does not depend on them).

Each runtime runs in its own process, as an application would load one, and the processes
take turns, A B C ... A B C, for `e2e_rounds` rounds (load from elsewhere hits them alike).
In one process the runtimes' thread pools slow each other: fan_jax's bf16 program measured
8.2 ms alone and 11 ms beside a float32 one (2-core AMX Xeon, 2026-12-07). The fan_jax
processes also time the network alone and the decode alone (the decode's share).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.harness import Config, Json, fmt, latency_stats, run_in_process, section

RUNTIMES = (
    "fan_jax_float32",
    "fan_jax_bfloat16",
    "tflite_float32",
    "onnxruntime",
    "openvino_float32",
    "openvino_bf16",
    "torch_eager_float32",
    "torch_eager_bf16_autocast",
)


def _inputs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 crop [1, S, S, 3], the crop-to-image affine of a 640x480 frame's face box)."""
    from fan_jax import geometry

    crop = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    m = geometry.crop_transform(np.array([200.0, 120.0, 380.0, 300.0]), size, 1.25)
    return crop, geometry.invert_affine(m[None])


def _to_image(pts: Any, back: np.ndarray) -> np.ndarray:
    from fan_jax import geometry

    return geometry.apply_affine(back, np.asarray(pts, np.float64))


def torch_decode(torch: Any, hm: Any) -> Any:
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


def _fan_jax(precision: str, L: int, size: int) -> dict[str, Callable[[], Any]]:
    import jax

    from benchmarks.jax_runners import init_variables
    from fan_jax import landmarks, predict
    from fan_jax.models import fan

    crop, back = _inputs(size)
    p = predict.Predictor(
        init_variables(L, size, seed=0), fan.mobilefan(L), L, size, detector=lambda im: None
    )
    p.set_precision(precision)
    # The variables built in, as `predict_crops` runs them (`Predictor._inference_fn`).
    network, variables = p.network_fn(), p.variables
    net = jax.jit(lambda c: network(variables, c), compiler_options=p.compiler_options())
    hm = jax.device_put(net(crop))
    decode = jax.jit(
        lambda h: landmarks.decode("heatmap", h, size), compiler_options=p.compiler_options()
    )
    return {
        f"fan_jax_{precision}": lambda: _to_image(p.predict_crops(crop)[0], back),
        # The network returning its heatmaps to the host (1.6 MB at 256 px, 98 points).
        f"fan_jax_{precision}_network_only": lambda: np.asarray(net(crop)),
        f"fan_jax_{precision}_decode_only": lambda: np.asarray(decode(hm)[0]),
    }


def _exported(name: str, size: int, tmp: str) -> dict[str, Callable[[], Any]]:
    from fan_jax.exported import load_exported

    crop, back = _inputs(size)
    x = crop.astype(np.float32)
    if name in ("tflite_float32", "onnxruntime"):
        rt = load_exported(os.path.join(tmp, "m.tflite" if name == "tflite_float32" else "m.onnx"))
        return {name: lambda: _to_image(rt(x)["landmarks"], back)}
    import openvino as ov

    core = ov.Core()
    hint = "bf16" if name == "openvino_bf16" else "f32"
    compiled = core.compile_model(
        core.read_model(os.path.join(tmp, "m.onnx")),
        "CPU",
        {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()
    port = next(o for o in compiled.outputs if "landmarks" in o.get_names())
    return {name: lambda: _to_image(request.infer({0: x})[port], back)}


def _torch(name: str, L: int, size: int, threads: int) -> dict[str, Callable[[], Any]]:
    import torch

    from benchmarks import torch_mobilefan
    from fan_jax import landmarks

    crop, back = _inputs(size)
    torch.set_num_threads(threads)
    model = torch_mobilefan.TorchMobileFAN(L).eval().to(memory_format=torch.channels_last)
    bf16 = name == "torch_eager_bf16_autocast"

    def run() -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(landmarks.normalize_np(crop)).permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                hm, _ = model(x)
            pts = torch_decode(torch, hm.float())
        return _to_image(pts.numpy(), back)

    return {name: run}


def worker(args: Json) -> Json:
    """In a fresh process: one runtime's repeats, {runner: {times, landmarks}}."""
    import time

    name, L, size = args["runtime"], args["num_landmarks"], args["image_size"]
    if name.startswith("fan_jax_"):
        runners = _fan_jax(name.removeprefix("fan_jax_"), L, size)
    elif name.startswith("torch_"):
        runners = _torch(name, L, size, args["torch_threads"])
    else:
        runners = _exported(name, size, args["tmp"])
    out: Json = {}
    for key, run in runners.items():
        for _ in range(args["warmup"] * args["iters"] + 1):
            result = run()
        times = []
        for _ in range(args["repeats"]):
            t0 = time.perf_counter()
            for _ in range(args["iters"]):
                run()
            times.append(time.perf_counter() - t0)
        out[key] = {"times": times, "landmarks": np.asarray(result).tolist()}
    return out


def _available(tmp: str, size: int, L: int, notes: Json) -> list[str]:
    """The runtimes this install can run; exports the model into `tmp` for the exported ones."""
    from benchmarks.jax_runners import init_variables
    from fan_jax.export import export
    from fan_jax.models import fan

    have = {
        m: importlib.util.find_spec(m) is not None
        for m in ("ai_edge_litert", "onnxruntime", "jax2onnx", "openvino", "torch")
    }
    model, variables = fan.mobilefan(L), init_variables(L, size, seed=0)
    out = ["fan_jax_float32", "fan_jax_bfloat16"]
    if have["ai_edge_litert"]:
        export(model, variables, size, "tflite", os.path.join(tmp, "m.tflite"))
        out.append("tflite_float32")
    else:
        notes["tflite"] = "skipped: pip install 'fan_jax[export]'"
    if have["jax2onnx"]:
        export(model, variables, size, "onnx", os.path.join(tmp, "m.onnx"))
        out += ["onnxruntime"] if have["onnxruntime"] else []
        if have["openvino"]:
            out += ["openvino_float32", "openvino_bf16"]
            notes["openvino_float32"] = {"precision_hint": "f32"}
            notes["openvino_bf16"] = {"precision_hint": "bf16"}
        else:
            notes["openvino"] = "skipped: pip install 'fan_jax[bench]' (the openvino wheel)"
    else:
        notes["onnx"] = "skipped: pip install 'fan_jax[export]'"
    if have["torch"]:
        out += ["torch_eager_float32", "torch_eager_bf16_autocast"]
    else:
        notes["torch"] = "skipped: pip install 'fan_jax[bench]'"
    return out


@section("e2e")
def e2e_section(cfg: Config) -> Json:
    """Batch-1 crop-to-image-landmarks latency, each runtime in its own process: fan_jax against TFLite, onnxruntime, OpenVINO and PyTorch eager."""
    from benchmarks import harness
    from fan_jax import precision

    size, L, iters = cfg.image_size, cfg.num_landmarks, cfg.export_iters_per_repeat
    out: Json = {"batch": 1, "image_size": size, "iters_per_repeat": iters}
    out["cpu_bf16_units"] = precision.bf16_units() or "none: bf16 runs without bf16 units"
    notes: Json = {}
    threads = cfg.torch_threads or harness.core_count()
    times: dict[str, list[float]] = {}
    marks: dict[str, np.ndarray] = {}
    rounds = max(1, cfg.e2e_rounds)
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = _available(tmp, size, L, notes)
        if "torch" not in notes:
            notes["torch"] = {"threads": threads, "memory_format": "channels_last"}
        base = dict(num_landmarks=L, image_size=size, tmp=tmp, torch_threads=threads)
        base.update(iters=iters, warmup=cfg.warmup, repeats=max(1, cfg.repeats // rounds))
        for _ in range(rounds):
            for name in runtimes:
                worker_args = {**base, "runtime": name}
                done = run_in_process(
                    "benchmarks.sections.e2e", "worker", worker_args, f"e2e worker for {name}"
                )
                for key, r in done.items():
                    times.setdefault(key, []).extend(r["times"])
                    marks[key] = np.asarray(r["landmarks"])
    stats = {name: latency_stats(t, iters) for name, t in times.items()}
    out.update(runtimes=stats, notes=notes, processes_per_runtime=rounds)
    # The exported peers run the same weights: their landmarks should be ours.
    ref = marks["fan_jax_float32"]
    out["median_px_vs_fan_jax"] = {
        k: float(np.median(np.abs(v - ref)))
        for k, v in marks.items()
        if not k.startswith(("fan_jax_", "torch_"))
    }
    ours = {k: v["latency_ms"] for k, v in stats.items() if k in RUNTIMES[:2]}
    best = min(ours, key=ours.__getitem__)
    e2e = ours[best]
    net_ms = stats[f"{best}_network_only"]["latency_ms"]
    decode_ms = stats[f"{best}_decode_only"]["latency_ms"]
    peers = {k: v["latency_ms"] for k, v in stats.items() if k in RUNTIMES[2:]}
    out.update(
        fan_jax_precision=best.removeprefix("fan_jax_"),
        network_ms=net_ms,
        decode_ms=decode_ms,
        decode_fraction_of_network=decode_ms / net_ms,
        bf16_over_float32=ours["fan_jax_float32"] / ours["fan_jax_bfloat16"],
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
            f"{100 * stats[best]['spread']:.0f}% / {100 * stats[peer]['spread']:.0f}%",
        )
        for peer, ms in peers.items()
    ]
    return out
