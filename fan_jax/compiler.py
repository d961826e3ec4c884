"""XLA compiler options per backend and role, chosen by measurement.

`jax.jit(fn, compiler_options=compiler_options('predict'))` applies them to that one
function: unlike `XLA_FLAGS`, which a process reads once, the training step and the
inference function can each get what is faster for it.

CPU, inference: XLA:CPU's default sends every dot to YNNPACK. For MobileFAN's eval forward
(many small 1x1-conv matmuls) its own dot emitter is faster: 1.08-1.29x at batch 1 and
1.12x at batch 8, interleaved in one process (2-core AMD EPYC, 2026-12-03;
`python benchmarks/xla_flags.py --per-jit --candidates default,no_ynn`). The training step
is the other way round (0.66x without YNNPACK, `--rounds 3 --candidates default,no_ynn`),
so 'train' keeps XLA's default.

CPU, inference with bf16 matmuls ('predict_bf16', `Predictor(precision='bfloat16')`): XLA's
own dot emitter has no bf16 kernel and lowers each bf16 dot to a converting loop fusion, so
the AMX / AVX512-BF16 units go unused; YNNPACK runs them on those units. On a 2-core Intel
Xeon with AMX (2026-12-07, each candidate in its own process): bf16 dots with YNNPACK 8.2 ms
at batch 1, float32 with XLA's emitter 9.6 ms, float32 with YNNPACK 11.4 ms, bf16 dots with
XLA's emitter 10.8 ms (`python benchmarks/op_profile.py` shows the converting fusions). So
'predict_bf16' keeps XLA's default.
"""

from __future__ import annotations

import os
from typing import Any

import jax

ROLES = ("train", "predict", "predict_bf16")

# {backend: {role: options}}; a missing entry means XLA's defaults.
DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {"predict": {"xla_cpu_experimental_ynn_fusion_type": ""}},
}


def compiler_options(role: str, backend: str | None = None) -> dict[str, Any] | None:
    """Options for `jax.jit(..., compiler_options=...)` of a `role` function on `backend`
    (default: JAX's default backend); None for XLA's defaults. An option also named in
    $XLA_FLAGS is left to the flag, so a user's setting wins."""
    if role not in ROLES:
        raise ValueError(f"compiler role must be one of {ROLES}, got {role!r}")
    if os.environ.get("FAN_JAX_COMPILER_DEFAULTS", "1") == "0":
        return None
    options = DEFAULTS.get(backend or jax.default_backend(), {}).get(role, {})
    flags = os.environ.get("XLA_FLAGS", "")
    options = {k: v for k, v in options.items() if f"--{k}" not in flags}
    return options or None


def predict_options(precision: str = "float32") -> dict[str, Any] | None:
    """Inference options for `precision` ('float32' | 'bfloat16' matmuls; see above)."""
    return compiler_options("predict_bf16" if precision == "bfloat16" else "predict")
