"""`--precision auto`: bf16 matmuls only on a CPU with bf16 units, and only where measured faster.

`choose(predictor)` returns ('float32' | 'bfloat16', reason). Without AMX-BF16 or AVX512-BF16
(the `lscpu` flags amx_bf16, avx512_bf16) it is float32 without measuring. With them, both
precisions are compiled at batch 1 and timed interleaved (median of 5 rounds of 5 calls);
bf16 is kept only when at least 5% faster. The result is cached per CPU model, model and
input size in $XDG_CACHE_HOME/fan_jax/precision.json (~/.cache), so the next start is free.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import numpy as np

BF16_UNITS = ("amx_bf16", "avx512_bf16")
MIN_GAIN = 1.05


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """(CPU model name, its feature flags) from /proc/cpuinfo ('' and {} elsewhere)."""
    name, flags = platform.processor() or "", set[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


def bf16_units() -> list[str]:
    return [u for u in BF16_UNITS if u in cpu_model_and_flags()[1]]


def _cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fan_jax", "precision.json")


def _time_calls(fn: Any, x: np.ndarray, calls: int = 5) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        np.asarray(fn(x)[0])
    return (time.perf_counter() - t0) / calls


def measure(predictor: Any, rounds: int = 5) -> dict[str, float]:
    """Median batch-1 seconds per call of `predictor.predict_crops` in each precision."""
    x = np.zeros((1, predictor.input_size, predictor.input_size, 3), np.uint8)
    was = predictor.precision
    fns = {}
    for p in ("float32", "bfloat16"):
        predictor.set_precision(p)
        run = predictor._run
        fns[p] = lambda crops, run=run: run(predictor.variables, crops)
        np.asarray(fns[p](x)[0])  # compile
    predictor.set_precision(was)
    times: dict[str, list[float]] = {p: [] for p in fns}
    for _ in range(rounds):
        for p, fn in fns.items():
            times[p].append(_time_calls(fn, x))
    return {p: float(np.median(t)) for p, t in times.items()}


def choose(predictor: Any) -> tuple[str, str]:
    """('float32' | 'bfloat16', why) for this CPU and predictor's model (see the module doc)."""
    name, flags = cpu_model_and_flags()
    units = [u for u in BF16_UNITS if u in flags]
    if not units:
        return (
            "float32",
            f"float32: {name or 'this CPU'} has no bf16 matmul units ({', '.join(BF16_UNITS)})",
        )
    key = f"{name}|{predictor.info.get('model', type(predictor.model).__name__)}|"
    key += f"{predictor.num_landmarks}|{predictor.input_size}"
    path = _cache_path()
    cache: dict[str, Any] = {}
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        t = measure(predictor)
        pick = "bfloat16" if t["float32"] >= MIN_GAIN * t["bfloat16"] else "float32"
        cache[key] = {"pick": pick, "ms": {p: round(1e3 * v, 3) for p, v in t.items()}}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: measure again next time
    entry = cache[key]
    ms = entry["ms"]
    return entry["pick"], (
        f"{entry['pick']}: batch-1 float32 {ms['float32']} ms, bf16 matmuls {ms['bfloat16']} ms "
        f"on {name} ({', '.join(units)})"
    )
