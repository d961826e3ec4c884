"""XLA:CPU flags against the default: the student's train step and batch-1 inference.

    python benchmarks/xla_flags.py [--rounds 2] [--quick] [--candidates default,onednn] [--json PATH]
    python benchmarks/xla_flags.py --per-jit [--candidates default,no_ynn]

XLA reads `XLA_FLAGS` once, when the backend starts, so each candidate runs in its own
process (under the same glibc malloc settings as `benchmarks/run.py`); rounds alternate the
candidates (A B C ... A B C) so a shared machine's load hits them alike, and each figure is
the median over rounds of per-process medians. `ratio_vs_default` > 1: the flag is faster.

`--per-jit` times inference only, in one process: each candidate's flags become that
function's `jax.jit(compiler_options=...)` (how `fan_jax.compiler` applies its choice),
all interleaved, at batch 1 and at the training batch. "default" there is XLA's own
default, not fan_jax's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Flags this jaxlib (0.10.2) accepts that could change CPU speed without changing results
# beyond float reassociation. 2026-12-03, 2-core AMD EPYC: none beat the default.
CANDIDATES: dict[str, str] = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "xnn_dot_eltwise": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
    "no_concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
}


def _worker(batch: int, size: int, num_landmarks: int, repeats: int) -> dict:
    from benchmarks.harness import time_interleaved
    from benchmarks.jax_runners import JaxStudentPredictor, JaxStudentTrainer

    trainer = JaxStudentTrainer(num_landmarks, batch, size)
    predictor = JaxStudentPredictor(num_landmarks, 1, size)
    steps, iters = 2, 10
    times = time_interleaved(
        {"train": lambda: trainer.run(steps), "infer": lambda: predictor.run(iters)},
        repeats,
        warmup=1,
    )
    return {
        "train_ms": 1e3 * statistics.median(times["train"]) / steps,
        "infer_ms": 1e3 * statistics.median(times["infer"]) / iters,
        "train_compile_s": trainer.compile_s,
        "final_loss": float(trainer.loss),
    }


def _check_candidates(names: list[str]) -> None:
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise ValueError(f"--candidates: unknown {unknown}; known: {sorted(CANDIDATES)}")


def flag_options(flags: str) -> tuple:
    """'--a=b --c=true' -> (('a', 'b'), ('c', True)): XLA flags as jit compiler options."""
    out = []
    for flag in flags.split():
        name, _, value = flag.removeprefix("--").partition("=")
        out.append((name, {"true": True, "false": False}.get(value, value)))
    return tuple(out)


def measure_per_jit(
    names: list[str], batches: tuple[int, ...], size: int, num_landmarks: int, repeats: int
) -> dict:
    """{name: {flags, infer_ms_b<B>..., ratio_vs_default_b<B>...}}, all in this process."""
    from benchmarks.harness import time_interleaved
    from benchmarks.jax_runners import JaxStudentPredictor

    _check_candidates(names)
    out: dict = {n: {"flags": CANDIDATES[n]} for n in names}
    for b in batches:
        iters = max(1, 10 // b)
        runners = {
            n: JaxStudentPredictor(num_landmarks, b, size, options=flag_options(CANDIDATES[n]))
            for n in names
        }
        times = time_interleaved(
            {n: (lambda r=r, iters=iters: r.run(iters)) for n, r in runners.items()},
            repeats,
            warmup=1,
        )
        for n in names:
            out[n][f"infer_ms_b{b}"] = 1e3 * statistics.median(times[n]) / iters
    if "default" in out:
        for s in out.values():
            for b in batches:
                s[f"ratio_vs_default_b{b}"] = out["default"][f"infer_ms_b{b}"] / s[f"infer_ms_b{b}"]
    return out


def measure(
    names: list[str], rounds: int, batch: int, size: int, num_landmarks: int, repeats: int
) -> dict:
    """{name: {flags, train_ms, infer_ms, ratio_vs_default...}} from `rounds` alternations."""
    _check_candidates(names)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            env = dict(os.environ, XLA_FLAGS=CANDIDATES[name])
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                json.dumps([batch, size, num_landmarks, repeats]),
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"candidate {name!r} ({CANDIDATES[name]}) failed:\n{proc.stderr[-2000:]}"
                )
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {}
    for name, rs in runs.items():
        out[name] = {
            "flags": CANDIDATES[name],
            "rounds": rs,
            **{
                k: statistics.median(r[k] for r in rs)
                for k in ("train_ms", "infer_ms", "train_compile_s")
            },
        }
    if "default" in out:
        for s in out.values():
            s["train_ratio_vs_default"] = out["default"]["train_ms"] / s["train_ms"]
            s["infer_ratio_vs_default"] = out["default"]["infer_ms"] / s["infer_ms"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per process")
    p.add_argument("--quick", action="store_true", help="batch 2 at 64 px (smoke test)")
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--json")
    p.add_argument(
        "--per-jit",
        action="store_true",
        help="inference only, one process, flags as per-function compiler options",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*json.loads(args.worker))))
        return {}
    batch, size = (2, 64) if args.quick else (8, 256)
    if args.per_jit:
        names = [c for c in args.candidates.split(",") if c]
        out = measure_per_jit(names, (1, batch), size, 98, max(args.repeats, 7))
        print(
            f"{'candidate':28s} "
            + " ".join(f"{f'b{b} ms':>8s} {'x default':>9s}" for b in (1, batch))
        )
        for name, s in out.items():
            print(
                f"{name:28s} "
                + " ".join(
                    f"{s[f'infer_ms_b{b}']:8.2f} {s.get(f'ratio_vs_default_b{b}', float('nan')):9.3f}"
                    for b in (1, batch)
                )
                + f"  {s['flags']}"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"per_jit": True, "image_size": size, "candidates": out}, f, indent=1)
        return out
    out = measure(
        [c for c in args.candidates.split(",") if c], args.rounds, batch, size, 98, args.repeats
    )
    print(
        f"{'candidate':28s} {'train ms':>9s} {'x default':>9s} {'infer ms':>9s} {'x default':>9s}  flags"
    )
    for name, s in out.items():
        print(
            f"{name:28s} {s['train_ms']:9.2f} {s.get('train_ratio_vs_default', float('nan')):9.3f} "
            f"{s['infer_ms']:9.2f} {s.get('infer_ratio_vs_default', float('nan')):9.3f}  {s['flags']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": batch, "image_size": size, "candidates": out}, f, indent=1)
    return out


if __name__ == "__main__":
    from fan_jax import allocator

    allocator.reexec_tuned()
    main()
