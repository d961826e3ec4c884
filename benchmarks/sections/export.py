"""Exported models (TFLite, ONNX) in their runtimes."""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from benchmarks.harness import (
    Config,
    Json,
    fmt,
    latency_stats,
    ratio,
    section,
    spread,
    time_interleaved,
)


def _missing_export_modules(formats: tuple[str, ...]) -> dict[str, list[str]]:
    """{format: missing modules} for the exporters and runtimes each format needs."""
    import importlib.util

    needs = {
        "tflite": ("tensorflow", "ai_edge_litert"),
        "onnx": ("jax2onnx", "onnxruntime"),
        "savedmodel": ("tensorflow",),
    }
    out = {}
    for name in formats:
        missing = [
            m for m in needs.get(name.partition("_")[0], ()) if importlib.util.find_spec(m) is None
        ]
        if missing:
            out[name] = missing
    return out


@section("export")
def export_section(cfg: Config) -> Json:
    """Batch-1 latency and file size of the exported student (TFLite, ONNX) in its runtime vs jitted JAX."""
    missing = _missing_export_modules(cfg.export_formats)
    formats = tuple(f for f in cfg.export_formats if f not in missing)
    note = {
        f: f"skipped: {', '.join(m)} not installed (pip install 'fan_jax[export]')"
        for f, m in missing.items()
    }
    if not formats:
        return {"skipped": "export dependencies missing", "formats": note}
    try:
        res = benchmark_exports(
            image_size=cfg.image_size,
            num_landmarks=cfg.num_landmarks,
            repeats=cfg.repeats,
            warmup=cfg.warmup,
            iters=cfg.export_iters_per_repeat,
            formats=formats,
            quick=cfg.quick,
        )
    except ImportError as e:  # a dependency present but broken: a note, not a failed report
        return {"skipped": f"export dependencies unusable: {e}", "formats": note}
    res.pop("rows", None)  # rebuilt below in this report's number format
    res.update(note)
    jax_stats = res["jax"]
    rows = []
    for name in formats:
        s = res[name]
        speedup = ratio(jax_stats["latency_ms"], s["latency_ms"])
        s["speedup_vs_jax"] = speedup
        rows.append(
            (
                f"export {name} latency ms (batch 1, {res['image_size']}px, {s['size_mib']:.3g} MiB file)",
                fmt(s["latency_ms"]),
                fmt(jax_stats["latency_ms"]),
                fmt(speedup, "x"),
                spread(s, jax_stats),
            )
        )
    res["rows"] = rows
    return res


def benchmark_exports(
    image_size: int = 256,
    num_landmarks: int = 98,
    repeats: int = 5,
    warmup: int = 1,
    iters: int = 10,
    workdir: str | None = None,
    formats: Iterable[str] = ("tflite", "tflite_float16", "tflite_int8", "onnx", "savedmodel"),
    num_threads: int | None = None,
    quick: bool = False,
) -> dict:
    """Batch-1 latency of each exported student in its runtime next to jitted JAX, and sizes.

    What `export_section` runs: returns {'jax': stats, '<format>': {stats, 'size_mib'},
    'summary': {...}, 'rows': [(metric, ours, baseline, ratio, spread)]} where 'ours' is the
    exported model and 'baseline' JAX. Without `workdir` a randomly initialised MobileFAN is
    used (latency does not depend on the weights; int8 calibration uses synthetic faces).
    Timings are medians over `repeats` of `iters` calls, interleaved across runtimes.
    """
    import jax
    import jax.numpy as jnp

    from fan_jax import compiler, predict
    from fan_jax.export import export, file_size, load_exported, synthetic_crops
    from fan_jax.export_graph import inference_fn
    from fan_jax.models import fan

    if quick:
        image_size, repeats, iters = min(image_size, 64), min(repeats, 2), min(iters, 2)
    if workdir:
        loaded = predict.load_student(workdir=workdir)
        model, variables, image_size = loaded.model, loaded.variables, loaded.input_size
        num_landmarks = loaded.num_landmarks
    else:
        model = fan.mobilefan(num_landmarks)
        variables = jax.jit(functools.partial(model.init, train=False))(
            jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        )
    x = synthetic_crops(1, image_size, seed=3).astype(np.float32)
    out: dict[str, Any] = {
        "batch": 1,
        "image_size": image_size,
        "num_landmarks": num_landmarks,
        "iters_per_repeat": iters,
    }
    # JAX runs the training layers (shifted-slice depthwise, matmul 1x1): the fast CPU form.
    # The native-conv graph that export traces is several times slower under XLA:CPU.
    jitted = jax.jit(
        inference_fn(model, variables, native_convs=False),
        compiler_options=compiler.compiler_options("predict"),
    )
    fns: dict[str, Callable[[], Any]] = {
        "jax": lambda: [jax.block_until_ready(jitted(x)) for _ in range(iters)]
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in formats:
            fmt, _, quant = name.partition("_")
            path = os.path.join(
                tmp,
                {"tflite": f"{name}.tflite", "onnx": "model.onnx", "savedmodel": "savedmodel"}[fmt],
            )
            t0 = time.perf_counter()
            export(
                model,
                variables,
                image_size,
                fmt,
                path,
                quantize=quant or "none",
                num_representative=8 if quick else 64,
            )
            rt = load_exported(path, num_threads=num_threads)
            out[name] = {"size_mib": file_size(path) / 2**20, "export_s": time.perf_counter() - t0}
            fns[name] = functools.partial(lambda r: [r(x) for _ in range(iters)], rt)
        times = time_interleaved(fns, repeats, warmup)
    rows = []
    jax_ms = 1e3 * float(np.median(times["jax"])) / iters
    out["jax"] = latency_stats(times["jax"], iters)
    for name in formats:
        out[name].update(latency_stats(times[name], iters))
        ms = out[name]["latency_ms"]
        rows.append(
            (
                f"export {name}: batch-1 latency ms vs JAX ({out[name]['size_mib']:.2f} MiB)",
                f"{ms:.3f}",
                f"{jax_ms:.3f}",
                f"{jax_ms / ms:.2f}x",
                f"{100 * out[name]['spread']:.0f}% / {100 * out['jax']['spread']:.0f}%",
            )
        )
    out["summary"] = {f"export_{n}_latency_ms": out[n]["latency_ms"] for n in formats}
    out["summary"].update({f"export_{n}_size_mib": out[n]["size_mib"] for n in formats})
    out["summary"]["export_jax_latency_ms"] = jax_ms
    out["rows"] = rows
    return out
