"""Per-op times of a whole compiled program, from a `jax.profiler` trace.

XLA:CPU's thunk executor records one trace event per HLO instruction it runs (a fusion, a
dot, a copy), so a trace of a few calls says where the program's time goes inside the
program, without the per-call dispatch that timing a layer alone adds. Each instruction's
`op_name` metadata (in the compiled HLO) keeps the flax module path it came from, which is
how ops are attributed to the model's layers.

    python benchmarks/op_profile.py [--precision float32,bfloat16] [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Events that are the executor's own bookkeeping, or that wrap the per-op events.
_NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool", "end: ")
_OP_NAME = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"", re.M)


def op_names(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: its op_name metadata} of a compiled program's text."""
    return {m.group(1): m.group(2) for m in _OP_NAME.finditer(hlo_text)}


def profile_ops(
    call: Callable[[], Any], calls: int, warmup: int = 3
) -> tuple[dict[str, float], float]:
    """({op: ms per call}, wall ms per call) of `call` (which must block until done).

    The wall time is measured outside the trace, so the tracer's own cost is not in it."""
    import jax
    from jax.profiler import ProfileData

    for _ in range(warmup):
        call()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    wall_ms = 1e3 * (time.perf_counter() - t0) / calls
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                call()
        (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = ProfileData.from_file(path)
    per_op: collections.Counter[str] = collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            # XLA's worker threads (the Python thread holds only dispatch events).
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if not ev.name.startswith(_NOT_OPS):
                    per_op[ev.name] += ev.duration_ns / 1e6 / calls
    return dict(per_op), wall_ms


def median_profile(
    call: Callable[[], Any], calls: int, rounds: int
) -> tuple[dict[str, float], float]:
    """`profile_ops` over `rounds` rounds: each op's and the wall time's median."""
    runs = [profile_ops(call, calls) for _ in range(max(1, rounds))]
    ops = {op: statistics.median(r[0].get(op, 0.0) for r in runs) for op in runs[-1][0]}
    return ops, statistics.median(r[1] for r in runs)


def attribute(
    op_ms: dict[str, float], names: dict[str, str], units: Iterable[tuple[str, set[str]]]
) -> tuple[dict[str, float], dict[str, float]]:
    """({unit: ms}, {op: ms} of ops no unit claims). A unit claims an op whose op_name path
    holds one of its module names as a segment; the deepest such segment wins, so a BN
    fused into the next layer's padding goes to that layer."""
    owner: dict[str, str] = {}
    for unit, modules in units:
        for m in modules:
            owner[m] = unit
    out: dict[str, float] = collections.defaultdict(float)
    other: dict[str, float] = {}
    for op, ms in op_ms.items():
        segments = names.get(op, "").split("/")
        hit = next((owner[s] for s in reversed(segments) if s in owner), None)
        if hit is None:
            other[op] = ms
        else:
            out[hit] += ms
    return dict(out), other


def _kind(op: str) -> str:
    """'ynn_fusion.35' -> 'ynn_fusion'; 'clamp_pad_fusion.2' -> 'loop fusion'."""
    base = op.split(".")[0]
    if base.endswith("_fusion") and not base.startswith(("ynn", "xnn", "onednn")):
        return "loop fusion"
    return base


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="float32,bfloat16")
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--num_landmarks", type=int, default=98)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from benchmarks.jax_runners import init_variables
    from fan_jax import predict
    from fan_jax.models import fan

    L, size = args.num_landmarks, args.image_size
    model = fan.mobilefan(L)
    p = predict.Predictor(init_variables(L, size), model, L, size, detector=lambda im: None)
    crop = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    report: dict = {}
    for prec in args.precision.split(","):
        p.precision = prec  # read when network_fn is traced, just below
        exe = (
            jax.jit(p.network_fn(), compiler_options=p.compiler_options())
            .lower(p.variables, crop)
            .compile()
        )
        names = op_names(exe.as_text())
        ops, wall = median_profile(
            lambda exe=exe: jax.block_until_ready(exe(p.variables, crop)), args.calls, args.rounds
        )
        kinds: collections.Counter[str] = collections.Counter()
        for op, ms in ops.items():
            kinds[_kind(op)] += ms
        top = sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]
        report[prec] = {
            "wall_ms": wall,
            "sum_of_ops_ms": sum(ops.values()),
            "by_kind_ms": dict(kinds.most_common()),
            "top_ops": [{"op": op, "ms": ms, "op_name": names.get(op, "")} for op, ms in top],
        }
        print(f"{prec}: wall {wall:.2f} ms per call, ops sum {sum(ops.values()):.2f} ms")
        print("  by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.most_common(8)))
        for op, ms in top:
            print(f"  {ms:6.3f} ms  {op:28s} {names.get(op, '')[-80:]}")
    return report


if __name__ == "__main__":
    main()
