"""The machine, and fan_jax's train step and inference against PyTorch eager."""

from __future__ import annotations

import os
import platform

from benchmarks import harness
from benchmarks.harness import (
    TORCH_MISSING,
    Config,
    Json,
    core_count,
    cpu_device,
    fmt,
    ratio,
    section,
    spread,
    summarize,
    time_interleaved,
    version,
)
from benchmarks.jax_runners import (
    JaxStudentPredictor,
    JaxStudentTrainer,
    matmul_peak,
    numpy_matmul_peak,
    with_peak,
)
from benchmarks.torch_runners import (
    TorchStudentPredictor,
    TorchStudentTrainer,
    best_torch,
    torch_key,
    torch_runners,
)
from fan_jax import allocator


@section("machine")
def machine_section(cfg: Config) -> Json:
    """Machine and library versions."""
    import jax

    info = {
        "cpu_count": os.cpu_count(),
        "cores_available": core_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "flax": version("flax"),
        "optax": version("optax"),
        "torch": version("torch"),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS"),
        # fan_jax.allocator: both frameworks run in this process, under the same malloc.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "malloc_tuned": allocator.is_tuned(),
    }
    # The bound the speed figures are given against: float32 matmul, XLA's and numpy's BLAS.
    n = 512 if cfg.quick else 2048
    info["matmul_peak_xla"] = matmul_peak(cpu_device(), "float32", n=n, repeats=cfg.repeats)
    info["matmul_peak_numpy"] = numpy_matmul_peak(n=n, repeats=cfg.repeats)
    best = max(info["matmul_peak_xla"], info["matmul_peak_numpy"], key=lambda p: p["flops_per_s"])
    harness.CONSUMERS["matmul_peak"] = best
    info["rows"] = [
        (
            "float32 matmul GFLOP/s (XLA / numpy)",
            fmt(info["matmul_peak_xla"]["flops_per_s"] / 1e9),
            fmt(info["matmul_peak_numpy"]["flops_per_s"] / 1e9),
            "",
            "",
        )
    ]
    return info


def _cpu_peak() -> float | None:
    """This CPU's matmul rate, measured by the machine section (None when it did not run)."""
    return harness.CONSUMERS.get("matmul_peak", {}).get("flops_per_s")


def _torch_thread_rows(out: Json, field: str, what: str) -> list:
    return [
        (f"  PyTorch {what} at {t} thread(s)", "", fmt(s[field]), "", spread(s))
        for t, s in out.get("torch_by_threads", {}).items()
    ]


@section("train")
def train_section(cfg: Config) -> Json:
    """Student train step images/s on the CPU: fan_jax (jit) vs PyTorch eager."""
    b, size, L = cfg.train_batch, cfg.image_size, cfg.num_landmarks
    steps = cfg.train_steps_per_repeat
    out: Json = {"batch": b, "image_size": size, "num_landmarks": L, "steps_per_repeat": steps}
    ours = JaxStudentTrainer(L, b, size, device=cpu_device())
    fns = {"fan_jax": lambda: ours.run(steps)}
    torch = harness.load_torch()
    if torch is not None:
        theirs, info = torch_runners(
            cfg, lambda f, t: TorchStudentTrainer(torch, L, b, size, f, t), 1
        )
        out.update(info)
        fns.update({torch_key(t): (lambda r=r: r.run(steps)) for t, r in theirs.items()})
    times = time_interleaved(fns, cfg.repeats, cfg.warmup)
    out["fan_jax"] = summarize(times["fan_jax"], work=b * steps)
    out["fan_jax"]["final_loss"] = float(ours.loss)
    out["fan_jax"]["compile_s"] = ours.compile_s
    with_peak(out["fan_jax"], ours.flops, steps, _cpu_peak())
    speedup = None
    if torch is not None:
        by_threads = {t: summarize(times[torch_key(t)], work=b * steps) for t in theirs}
        for t, s in by_threads.items():
            s["final_loss"] = theirs[t].loss
        best = best_torch(by_threads, lambda s: s["per_s"])
        out["torch_threads"], out["torch"] = best, by_threads[best]
        out["torch_by_threads"] = {str(t): s for t, s in by_threads.items()}
        speedup = ratio(out["fan_jax"]["per_s"], out["torch"]["per_s"])
    else:
        out["torch"] = TORCH_MISSING
    harness.CONSUMERS["train"] = {
        "images_per_s": out["fan_jax"]["per_s"],
        "batch": b,
        "image_size": size,
        "step": "CPU student train step (train section)",
    }
    out["summary"] = {
        "train_speedup_vs_torch": speedup,
        "train_fraction_of_matmul_peak": out["fan_jax"].get("fraction_of_matmul_peak"),
    }
    out["rows"] = [
        (
            f"train images/s (batch {b}, {size}px), vs PyTorch at its faster thread setting "
            f"({out.get('torch_threads', '-')})",
            fmt(out["fan_jax"]["per_s"]),
            fmt(out["torch"].get("per_s")),
            fmt(speedup, "x"),
            spread(out["fan_jax"], out["torch"]),
        )
    ]
    out["rows"] += _torch_thread_rows(out, "per_s", "train images/s")
    return out


@section("inference")
def inference_section(cfg: Config) -> Json:
    """Student eval-mode latency at batch 1 on the CPU: fan_jax (jit) vs PyTorch eager (inference_mode)."""
    size, L, iters = cfg.image_size, cfg.num_landmarks, cfg.infer_iters_per_repeat
    out: Json = {"batch": 1, "image_size": size, "iters_per_repeat": iters}
    ours = JaxStudentPredictor(L, 1, size, device=cpu_device())
    fns = {"fan_jax": lambda: ours.run(iters)}
    torch = harness.load_torch()
    if torch is not None:
        theirs, info = torch_runners(
            cfg, lambda f, t: TorchStudentPredictor(torch, L, 1, size, f, t), max(1, iters // 4)
        )
        out.update(info)
        fns.update({torch_key(t): (lambda r=r: r.run(iters)) for t, r in theirs.items()})
    times = time_interleaved(fns, cfg.repeats, cfg.warmup)
    summaries = {}
    for name in fns:
        s = summarize(times[name], work=iters)
        s["latency_ms"] = 1e3 * s["median_s"] / iters
        summaries[name] = s
    out["fan_jax"] = summaries["fan_jax"]
    out["fan_jax"]["compile_s"] = ours.compile_s
    with_peak(out["fan_jax"], ours.flops, iters, _cpu_peak())
    speedup = None
    if torch is not None:
        by_threads = {t: summaries[torch_key(t)] for t in theirs}
        best = best_torch(by_threads, lambda s: -s["latency_ms"])
        out["torch_threads"], out["torch"] = best, by_threads[best]
        out["torch_by_threads"] = {str(t): s for t, s in by_threads.items()}
        speedup = ratio(out["torch"]["latency_ms"], out["fan_jax"]["latency_ms"])
    else:
        out["torch"] = TORCH_MISSING
    out["summary"] = {
        "inference_speedup_vs_torch": speedup,
        "inference_latency_ms": out["fan_jax"]["latency_ms"],
        "inference_fraction_of_matmul_peak": out["fan_jax"].get("fraction_of_matmul_peak"),
    }
    out["rows"] = [
        (
            f"inference latency ms (batch 1, {size}px), vs PyTorch at its faster thread setting "
            f"({out.get('torch_threads', '-')})",
            fmt(out["fan_jax"]["latency_ms"]),
            fmt(out["torch"].get("latency_ms")),
            fmt(speedup, "x"),
            spread(out["fan_jax"], out["torch"]),
        )
    ]
    out["rows"] += _torch_thread_rows(out, "latency_ms", "inference latency ms")
    return out
