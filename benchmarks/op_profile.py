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
_NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ")
# One call of the whole program, on the thread that waits for it to finish.
_PROGRAM = "ThunkExecutor::Execute (wait for completion)"
_OP_NAME = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"", re.M)
_CALLS = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?\bcalls=%?([\w.\-]+)", re.M)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)^\}", re.M | re.S)


def op_names(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: its op_name metadata} of a compiled program's text."""
    return {m.group(1): m.group(2) for m in _OP_NAME.finditer(hlo_text)}


def fused_op_names(hlo_text: str) -> dict[str, list[str]]:
    """{HLO instruction name: the op_names of the instructions fused into it, or its own}.

    XLA names a fusion after one of its instructions (often the padding it ends in), while
    its work may come from another layer: with the inference forms the stem's 27 taps run in
    a loop named for expanded_conv's padding."""
    bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
    out = {op: [name] for op, name in op_names(hlo_text).items()}
    for m in _CALLS.finditer(hlo_text):
        inner = [n.group(2) for n in _OP_NAME.finditer(bodies.get(m.group(2), ""))]
        if inner:
            out[m.group(1)] = inner
    return out


def wall_shares(
    events: Iterable[tuple[int, int, str, str]], programs: Iterable[tuple[int, int]] = ()
) -> dict[str, float]:
    """{op: ns of wall clock} from (start_ns, end_ns, thread, op) events.

    While k threads run ops at once each op gets 1/k of that time, and of events nested on
    one thread the innermost gets it, so the shares never count time twice (summed
    durations do: XLA runs independent ops on several threads at once). Time inside one of
    the `programs` (start_ns, end_ns) in which no op runs goes to the op that ended last
    ('(executor)' before the first): a float32 dot's thunk returns before the Eigen threads
    finish it, and 1.4 of the float32 program's 8.3 ms were such gaps after dots. So the
    shares add up to the programs' time."""
    events, points = list(events), []
    for i, (start, end, _, _) in enumerate(events):
        if end > start:  # an instant event runs for no time (and would never close)
            points += [(start, 1, i), (end, 0, i)]  # ends sort before starts at one instant
    points += [p for start, end in programs if end > start for p in ((start, 1, -1), (end, 0, -1))]
    points.sort()
    active: dict[str, list[int]] = collections.defaultdict(list)  # thread -> open events
    shares: collections.Counter[str] = collections.Counter()
    open_programs, last_op = 0, "(executor)"
    last = points[0][0] if points else 0
    for t, is_start, i in points:
        running = [stack[-1] for stack in active.values() if stack]
        for j in running:
            shares[events[j][3]] += (t - last) / len(running)
        if not running and open_programs:
            shares[last_op] += t - last
        last = t
        if i < 0:  # a program starts or ends
            open_programs += 1 if is_start else -1
            last_op = "(executor)"
            continue
        stack = active[events[i][2]]
        if is_start:
            stack.append(i)
        elif i in stack:
            stack.remove(i)
            last_op = events[i][3]
    return dict(shares)


def profile_ops(
    call: Callable[[], Any], calls: int, warmup: int = 3
) -> tuple[dict[str, float], float, float]:
    """({op: ms per call}, wall ms per call, traced program ms per call) of `call` (which
    must block until done).

    Each op's time is its share of the program's time in the trace (`wall_shares`), scaled
    by the wall time over the traced program time, so the ops add up to the wall time: the
    wall time is measured outside the trace, and the tracer slows some programs unevenly
    (bf16 batch 1 at 256 px: 0.9-1.3x between processes), so only the shares are the
    trace's. The wall time includes the per-call dispatch; the ops' shares absorb it."""
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
    events, programs = [], []
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for k, line in enumerate(plane.lines):
            # XLA's worker threads (the Python thread holds only dispatch events).
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if ev.name == _PROGRAM:
                    programs.append((ev.start_ns, ev.end_ns))
                elif not ev.name.startswith(_NOT_OPS):
                    events.append((ev.start_ns, ev.end_ns, f"{plane.name}/{k}", ev.name))
    shares = wall_shares(events, programs)
    # The program's time in the trace: its ops' shares, gaps inside it included (not every
    # call leaves a program event: a small program may run inline in the caller's thread).
    traced_ms = sum(shares.values()) / 1e6 / calls
    scale = wall_ms / traced_ms if traced_ms > 0 else 1.0
    return {op: scale * ns / 1e6 / calls for op, ns in shares.items()}, wall_ms, traced_ms


def median_profile(
    call: Callable[[], Any], calls: int, rounds: int
) -> tuple[dict[str, float], float, float]:
    """`profile_ops` over `rounds` rounds: each op's, the wall time's and the traced
    program time's median."""
    runs = [profile_ops(call, calls) for _ in range(max(1, rounds))]
    ops = {op: statistics.median(r[0].get(op, 0.0) for r in runs) for op in runs[-1][0]}
    return ops, statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)


def attribute(
    op_ms: dict[str, float], names: dict[str, Any], units: Iterable[tuple[str, set[str]]]
) -> tuple[dict[str, float], dict[str, float]]:
    """({unit: ms}, {op: ms} of ops no unit claims). `names`: {op: its op_name, or the op_names
    of the instructions fused into it (`fused_op_names`)}. Each op_name votes for the unit
    whose module it names as its deepest segment; the op goes to the unit with most votes
    (the first named wins a tie: in a fusion, the instruction computed first). So a loop that computes the stem's taps and ends in the next
    layer's padding goes to the stem, and a plain BN + ReLU6 + padding to the BN's unit."""
    owner: dict[str, str] = {}
    for unit, modules in units:
        for m in modules:
            owner[m] = unit
    out: dict[str, float] = collections.defaultdict(float)
    other: dict[str, float] = {}
    for op, ms in op_ms.items():
        listed = names.get(op, "")
        votes: collections.Counter[str] = collections.Counter()
        for name in [listed] if isinstance(listed, str) else listed:
            segments = name.split("/")
            hit = next((owner[s] for s in reversed(segments) if s in owner), None)
            if hit is not None:
                votes[hit] += 1
        if votes:
            out[votes.most_common(1)[0][0]] += ms
        else:
            other[op] = ms
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

    from benchmarks.jax_runners import predictor_program

    report: dict = {}
    for prec in args.precision.split(","):
        call, hlo = predictor_program(args.num_landmarks, args.image_size, prec)
        names = op_names(hlo)
        ops, wall, traced = median_profile(call, args.calls, args.rounds)
        kinds: collections.Counter[str] = collections.Counter()
        for op, ms in ops.items():
            kinds[_kind(op)] += ms
        top = sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]
        report[prec] = {
            "wall_ms": wall,
            "traced_program_ms": traced,
            "sum_of_ops_ms": sum(ops.values()),
            "by_kind_ms": dict(kinds.most_common()),
            "top_ops": [{"op": op, "ms": ms, "op_name": names.get(op, "")} for op, ms in top],
        }
        print(
            f"{prec}: wall {wall:.2f} ms per call (traced {traced:.2f}), "
            f"ops sum {sum(ops.values()):.2f} ms"
        )
        print("  by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.most_common(8)))
        for op, ms in top:
            print(f"  {ms:6.3f} ms  {op:28s} {names.get(op, '')[-80:]}")
    return report


if __name__ == "__main__":
    main()
