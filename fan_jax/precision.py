"""`--precision auto`: bf16 matmuls only on a CPU with bf16 units, and only where measured faster.

`choose(predictor)` returns ('float32' | 'bfloat16', reason). Without AMX-BF16 or AVX512-BF16
(the `lscpu` flags amx_bf16, avx512_bf16) it is float32 without measuring. With them, both
precisions are compiled at batch 1 and timed, each in its own process, twice each, A B A B
(median of 5 rounds of 5 calls); bf16 is kept only when at least 5% faster. The result is
cached per CPU model, model, input size and jaxlib version in
$XDG_CACHE_HOME/fan_jax/precision.json (~/.cache), so the next start is free.
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
# Bumped when what either precision compiles to changes (v2: bf16 matmuls with YNNPACK;
# v3: the bf16 program keeps its patch stem float32, and both unroll few-channel matmuls).
MEASURE_VERSION = 3


def _jaxlib_version() -> str:
    import jaxlib

    return str(getattr(jaxlib, "__version__", "?"))


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


def _worker(spec_path: str, precision: str, rounds: int) -> None:
    """In a fresh process: the pickled predictor's program (as `Predictor` compiles it in
    `precision`), its batch-1 median seconds printed as JSON."""
    import cloudpickle
    import jax

    from fan_jax import compiler, landmarks
    from fan_jax.models.layers import inference_forms

    with open(spec_path, "rb") as f:
        spec = cloudpickle.load(f)

    def run(variables: Any, crops: Any) -> Any:
        with inference_forms(precision):
            return landmarks.landmarks(spec["kind"], spec["model"], variables, crops, None)

    variables = jax.device_put(spec["variables"])
    # The variables built in, as `Predictor._inference_fn` compiles them.
    call = jax.jit(
        lambda crops: run(variables, crops), compiler_options=compiler.predict_options(precision)
    )
    size = spec["input_size"]
    x = np.zeros((1, size, size, 3), np.uint8)
    np.asarray(call(x)[0])  # compile
    times = [_time_calls(call, x) for _ in range(rounds)]
    print(json.dumps({"s": float(np.median(times))}))


def measure(predictor: Any, rounds: int = 5, alternations: int = 2) -> dict[str, float]:
    """Median batch-1 seconds per call of `predictor.predict_crops` in each precision.

    Each precision runs in its own process, alternately (A B A B), because the two compile
    with different XLA dot backends (fan_jax.compiler), and in one process the second
    backend's thread pool slows the first's programs (bf16 measured 8.2 ms alone, 11 ms
    beside a float32 program, on a 2-core AMX Xeon)."""
    import subprocess
    import sys
    import tempfile

    import cloudpickle
    import jax

    spec = {
        "variables": jax.device_get(predictor.variables),
        "model": predictor.model,
        "num_landmarks": predictor.num_landmarks,
        "input_size": predictor.input_size,
        "kind": predictor.kind,
    }
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "predictor.pkl")
        with open(path, "wb") as f:
            cloudpickle.dump(spec, f)
        for _ in range(alternations):
            for p in times:
                code = (
                    "import sys; from fan_jax import precision; "
                    "precision._worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
                )
                out = subprocess.run(
                    [sys.executable, "-c", code, path, p, str(rounds)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                times[p].append(json.loads(out.stdout.strip().splitlines()[-1])["s"])
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
    # A new jaxlib or a new way of compiling either precision invalidates old measurements.
    key += f"|jaxlib {_jaxlib_version()}|v{MEASURE_VERSION}"
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
