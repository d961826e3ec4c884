"""The machine, and fan_jax's train step and inference against PyTorch eager."""

from __future__ import annotations

import os
import platform

from benchmarks import harness
from benchmarks.harness import (Config, Json, TORCH_MISSING, core_count, cpu_device, fmt, ratio,
                                section, spread, summarize, time_interleaved, version)
from benchmarks.jax_runners import JaxStudentPredictor, JaxStudentTrainer
from benchmarks.torch_runners import TorchStudentPredictor, TorchStudentTrainer, pick_torch_runner


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
    }
    return info


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
        theirs, info = pick_torch_runner(cfg, lambda f, t: TorchStudentTrainer(torch, L, b, size, f, t), 1)
        out.update(info)
        fns["torch"] = lambda: theirs.run(steps)
    times = time_interleaved(fns, cfg.repeats, cfg.warmup)
    out["fan_jax"] = summarize(times["fan_jax"], work=b * steps)
    out["fan_jax"]["final_loss"] = float(ours.loss)
    out["fan_jax"]["compile_s"] = ours.compile_s
    speedup = None
    if torch is not None:
        out["torch"] = summarize(times["torch"], work=b * steps)
        out["torch"]["final_loss"] = theirs.loss
        speedup = ratio(out["fan_jax"]["per_s"], out["torch"]["per_s"])
    else:
        out["torch"] = TORCH_MISSING
    harness.CONSUMERS["train"] = {"images_per_s": out["fan_jax"]["per_s"], "batch": b, "image_size": size,
                          "step": "CPU student train step (train section)"}
    out["summary"] = {"train_speedup_vs_torch": speedup}
    out["rows"] = [(f"train images/s (batch {b}, {size}px)", fmt(out["fan_jax"]["per_s"]),
                    fmt(out["torch"].get("per_s")), fmt(speedup, "x"),
                    spread(out["fan_jax"], out["torch"]))]
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
        theirs, info = pick_torch_runner(cfg, lambda f, t: TorchStudentPredictor(torch, L, 1, size, f, t),
                                         max(1, iters // 4))
        out.update(info)
        fns["torch"] = lambda: theirs.run(iters)
    times = time_interleaved(fns, cfg.repeats, cfg.warmup)
    for name in fns:
        s = summarize(times[name], work=iters)
        s["latency_ms"] = 1e3 * s["median_s"] / iters
        out[name] = s
    out["fan_jax"]["compile_s"] = ours.compile_s
    speedup = None
    if torch is not None:
        speedup = ratio(out["torch"]["latency_ms"], out["fan_jax"]["latency_ms"])
    else:
        out["torch"] = TORCH_MISSING
    out["summary"] = {"inference_speedup_vs_torch": speedup}
    out["rows"] = [(f"inference latency ms (batch 1, {size}px)", fmt(out["fan_jax"]["latency_ms"]),
                    fmt(out["torch"].get("latency_ms")), fmt(speedup, "x"),
                    spread(out["fan_jax"], out["torch"]))]
    return out
