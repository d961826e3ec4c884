"""The benchmark harness: what to measure (`Config`), the section registry, timing and
summary helpers, shared by every section module and by `benchmarks/run.py`."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

Json = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Config:
    """What to measure; ``Config.quick_config()`` is the smoke-test variant (tiny shapes, few repeats)."""

    repeats: int = 5
    warmup: int = 1
    num_landmarks: int = 98
    train_batch: int = 8
    image_size: int = 256
    train_steps_per_repeat: int = 2
    infer_iters_per_repeat: int = 10
    fs_batch: int = 8
    fs_size: int = 64  # the largest (64x64) tap
    fs_student_channels: int = 128
    fs_teacher_channels: int = 256
    fs_direct_repeats: int = 3  # the N x N form takes seconds per call on a small CPU
    torch_format: str = "auto"  # 'auto' | 'contiguous' | 'channels_last'
    # None: probe the core count and 1 thread, keep the faster. OpenMP's barriers collapse when
    # a shared machine deschedules one of torch's threads (10x slower at load > cores), while
    # one thread does not; probing keeps the baseline fair to torch under either condition.
    torch_threads: int | None = None
    accel_dtypes: tuple[str, ...] = ("float32", "bfloat16")  # train.compute_dtype values to time
    accel_train_batches: tuple[int, ...] = (1, 8, 256)
    accel_infer_batches: tuple[int, ...] = (1, 256)
    accel_steps_per_repeat: int = (
        5  # accelerator steps are ms: more per repeat beats timer/dispatch noise
    )
    accel_iters_per_repeat: int = 20
    accel_distill_batch: int = 32
    accel_layer_batch: int = 8
    accel_forms_batch: int = 8
    layers_infer_batch: int = 1
    layers_train_batch: int = 8
    force_accelerator: bool = False  # run the accelerator section even on CPU
    pipeline_workers: tuple[int, ...] = (0, 1, 2)  # 0: grain's map in this process
    pipeline_examples: int = 64  # distinct synthetic faces in the in-memory source
    pipeline_face_size: int = 480  # rendered photo side: crops come out ~450 px, as 300W's (<= 512)
    pipeline_batch: int = 32
    pipeline_batches: int = 20  # timed batches per measurement (after 2 warm-up batches)
    pipeline_repeats: int = 2  # each measurement spawns its workers again (seconds of start-up)
    distill_student: str = "mobilefan"
    distill_teacher: str = "teacher"  # ResNet-50 FAN
    distill_repeats: int = 3  # the teacher makes a distill step seconds long on a small CPU
    distill_direct_repeats: int = 1  # N x N FS form: ~2x the Gram step's time and memory
    export_formats: tuple[str, ...] = ("tflite", "tflite_float16", "tflite_int8", "onnx")
    export_iters_per_repeat: int = 10
    e2e_rounds: int = 2  # processes per runtime, taking turns (each runs repeats / rounds)
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> Config:
        base = dict(
            repeats=2,
            warmup=1,
            train_batch=2,
            image_size=64,
            train_steps_per_repeat=1,
            infer_iters_per_repeat=2,
            fs_batch=2,
            fs_size=16,
            fs_direct_repeats=2,
            torch_format="contiguous",
            torch_threads=1,
            accel_train_batches=(2,),
            accel_infer_batches=(1,),
            accel_steps_per_repeat=1,
            accel_iters_per_repeat=2,
            accel_distill_batch=2,
            accel_layer_batch=1,
            accel_forms_batch=2,
            layers_train_batch=2,
            pipeline_workers=(0, 1),
            pipeline_examples=4,
            pipeline_face_size=160,
            pipeline_batch=2,
            pipeline_batches=2,
            pipeline_repeats=1,
            distill_teacher="resnet18_fan",
            distill_repeats=1,
            distill_direct_repeats=1,
            export_formats=("tflite", "onnx"),
            export_iters_per_repeat=2,
            quick=True,
        )
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    fn: Callable[[Config], Json]
    default: bool
    doc: str


SECTIONS: dict[str, Section] = {}


def section(
    name: str, default: bool = True
) -> Callable[[Callable[[Config], Json]], Callable[[Config], Json]]:
    """Registers ``fn(config) -> dict`` as a report section, run in registration order."""

    def register(fn: Callable[[Config], Json]) -> Callable[[Config], Json]:
        if name in SECTIONS:
            raise ValueError(f"benchmark section {name!r} registered twice")
        SECTIONS[name] = Section(
            name, fn, default, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        )
        return fn

    return register


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    repeats_per_fn: dict[str, int] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Wall time of each ``fn()`` (which must block until its work is done), interleaved A B A B.

    ``warmup`` untimed calls per function come first (compilation, allocator warm-up).
    ``repeats_per_fn`` lets an expensive function drop out of the rotation early.
    """
    counts = {name: (repeats_per_fn or {}).get(name, repeats) for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max(counts.values(), default=0)):
        for name, fn in fns.items():
            if r < counts[name]:
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    return times


def summarize(times: list[float], work: float = 1.0) -> Json:
    """Median and spread of repeat times; ``work`` items per repeat gives a rate (items/s)."""
    if not times:
        raise ValueError("no timings to summarise")
    median = statistics.median(times)
    return {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "spread": (max(times) - min(times)) / median if median > 0 else 0.0,  # (max-min)/median
        "repeats": len(times),
        "per_s": work / median if median > 0 else float("inf"),
    }


def latency_stats(times: list[float], iters: int) -> Json:
    """Per-call latency (ms) of repeats that each made `iters` calls: median, spread, count."""
    med = float(statistics.median(times))
    return {
        "latency_ms": 1e3 * med / iters,
        "spread": (max(times) - min(times)) / med,
        "repeats": len(times),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_process(
    module: str, function: str, args: Any, what: str, malloc: str = "application"
) -> Any:
    """`module.function(args)` in a fresh Python process (`args` and the result JSON): for work
    whose timing another backend's threads in this process would disturb. `what` names it
    in the error, which carries the process's stderr tail.

    `malloc='application'` starts it with glibc's malloc as `fan_jax.predict` and
    `fan_jax.video` run (this process's training tunables dropped: their single arena cost
    batch-1 inference ~0.5 ms of ~8, 2-core AMX Xeon, 2026-12-07); 'inherit' keeps them."""
    import json
    import subprocess

    from fan_jax import allocator

    code = f"import json, sys; from {module} import {function} as f; "
    code += "print(json.dumps(f(json.loads(sys.argv[1]))))"
    env = allocator.untuned_environ() if malloc == "application" else dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def load_torch() -> Any | None:
    """The torch module, or None (with a message) when the optional extra is missing."""
    try:
        import torch
    except ImportError:
        print(
            "torch not installed: skipping the PyTorch columns (pip install 'fan_jax[bench]')",
            file=sys.stderr,
        )
        return None
    return torch


TORCH_MISSING = {"skipped": "torch not installed (pip install torch==2.13.0)"}


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


CONSUMERS: dict[str, Json] = {}


def fmt(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}{unit}"


def cpu_device() -> Any:
    """The CPU device: the PyTorch comparisons run both frameworks on the host CPU even when
    an accelerator is present (the accelerator has its own section)."""
    import jax

    return jax.devices("cpu")[0]


def spread(*stats: Json) -> str:
    return " / ".join(f"{100 * s['spread']:.0f}%" for s in stats if "spread" in s)


def bytes_field(mem: Any, field: str) -> int | None:
    return None if mem is None else int(getattr(mem, field, 0))


def mib(x: int | None) -> float | None:
    return None if x is None else x / 2**20
