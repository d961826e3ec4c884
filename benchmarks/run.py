"""fan_jax benchmark report: ``python benchmarks/run.py [--json PATH] [--repeats N] [--quick] [--sections a,b]``.

Each section is a function in its own module of ``benchmarks/sections/`` (speed, layers, fs_loss,
accelerator, distill, pipeline, export), registered with ``harness.section(name)``; it takes
the run's ``Config`` and returns a JSON-able dict. The train step timed is the project's own
``fan_jax.steps.train_step`` (``jax_runners``). A section may add:
  - ``"summary"``: headline numbers hoisted to the top level of the report (> 1 = ours faster);
  - ``"rows"``: table rows ``(metric, ours, baseline, ratio, spread)`` for the printed table
    (left out of the JSON).
To add a section, write one such function. Sections run in registration order (batch-1 latency
first: ``LATENCY_FIRST``); a train step's
images/s goes into ``harness.CONSUMERS`` so the later ``pipeline`` section can size the input pipeline for it.

Timings are medians over ``--repeats`` after warm-up (which includes compilation), with
``block_until_ready`` / synchronous PyTorch calls. Competing measurements are interleaved
(A B A B ...) so load from other processes on a shared machine hits both alike. The fan_jax
models get host-filled random weights (``init_variables``), not ``model.init``, whose compile
takes minutes on a small CPU; speed does not depend on the values.
PyTorch is optional (``pip install fan_jax[bench]``): without it the torch columns are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

if __package__ in (None, ""):
    # Run as a script: make `benchmarks` importable from a checkout.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    # As `python -m fan_jax.main` does: glibc malloc settings that let XLA:CPU (and PyTorch)
    # reuse freed blocks; both frameworks run under them (FAN_JAX_MALLOC=default: glibc's own).
    from fan_jax import allocator

    allocator.reexec_tuned()

from benchmarks import harness
from benchmarks.harness import Config, Json

# Importing the section modules registers their sections; their order is the report's.
from benchmarks.sections import (  # noqa: F401
    accelerator,
    distill,
    e2e,
    export,
    fs_loss,
    layers,
    pipeline,
    realtime,
    speed,
)

LATENCY_FIRST = ("machine", "e2e", "inference", "export", "video")

# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def run_sections(
    cfg: Config,
    names: list[str] | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> tuple[Json, list]:
    """Runs the named sections (default: every default section) -> (report, table rows)."""
    names = [n for n, s in harness.SECTIONS.items() if s.default] if names is None else names
    # Batch-1 latency first: under the tuned malloc (one arena, `fan_jax.allocator`), inference
    # after the train and distill steps' GB-sized blocks runs 1.5-3x slower (9 ms -> 14-43 ms
    # here), which is not how `fan_jax.predict` or an exported model is run. Stable otherwise.
    names = [n for n in LATENCY_FIRST if n in names] + [n for n in names if n not in LATENCY_FIRST]
    unknown = [n for n in names if n not in harness.SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; available: {list(harness.SECTIONS)}")
    report: Json = {"config": dataclasses.asdict(cfg), "sections": {}}
    rows: list = []
    for name in names:
        log(f"[benchmark] {name} ...")
        t0 = time.perf_counter()
        result = dict(harness.SECTIONS[name].fn(cfg))
        result["section_wall_s"] = time.perf_counter() - t0
        report.update(result.pop("summary", {}))
        rows += result.pop("rows", [])
        report["sections"][name] = result
        log(f"[benchmark] {name} done in {result['section_wall_s']:.1f}s")
    # Headline numbers first, then machine and config, then the raw sections.
    ordered = {k: v for k, v in report.items() if k not in ("config", "sections")}
    if "machine" in report["sections"]:
        ordered["machine"] = report["sections"].pop("machine")
    ordered["config"], ordered["sections"] = report["config"], report["sections"]
    return ordered, rows


def format_table(rows: list) -> str:
    header = ("metric", "ours", "baseline", "ratio (>1: ours faster)", "spread (ours / baseline)")
    rows = [header] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="sections: " + ", ".join(f"{n} ({s.doc})" for n, s in harness.SECTIONS.items()),
    )
    p.add_argument("--json", default="out/benchmark.json", help="where to write the JSON report")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per measurement (default 5; quick 2)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes and repeats: a smoke test, not a measurement",
    )
    p.add_argument(
        "--sections",
        default=None,
        help="comma-separated sections to run (default: all default ones); "
        "naming 'accelerator' runs it on CPU too",
    )
    p.add_argument(
        "--torch-format",
        choices=("auto", "contiguous", "channels_last"),
        default=None,
        help="PyTorch memory format; auto (default outside --quick) keeps the faster one",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="PyTorch intra-op threads (default: probe the core count and 1, keep the faster)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Json:
    args = parse_args(argv)
    overrides: Json = {}
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.torch_format is not None:
        overrides["torch_format"] = args.torch_format
    if args.torch_threads is not None:
        overrides["torch_threads"] = args.torch_threads
    names = None
    if args.sections:
        names = [n.strip() for n in args.sections.split(",") if n.strip()]
        overrides["force_accelerator"] = "accelerator" in names
        if "machine" not in names:
            names.insert(0, "machine")
    cfg = Config.quick_config(**overrides) if args.quick else Config(**overrides)
    report, rows = run_sections(cfg, names)
    print(format_table(rows))
    headline = {k: v for k, v in report.items() if k not in ("config", "sections", "machine")}
    print(json.dumps(headline, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
