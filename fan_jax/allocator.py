"""Host memory: let XLA:CPU reuse freed blocks instead of page-faulting fresh ones every step.

Each call of a compiled XLA:CPU program allocates its temporaries as one block (about 700 MB
for MobileFAN's train step at batch 8), often from a worker thread. glibc serves a block that
large with a fresh `mmap` and unmaps it on free, so every step page-faults and zeroes all of
it again: ~180k faults and about 0.4 s of kernel time per step on a 2-core machine, a third
of the step. With every thread on glibc's main heap, no `mmap` for large blocks and a high
trim threshold, the block is reused from the second step on (no faults, ~1.4x faster steps;
`benchmarks/run.py` reports the figures). PyTorch's CPU allocator gains from it too.

glibc reads these settings only at process start, so the command-line entry points
(`python -m fan_jax.main`, `benchmarks/run.py`) re-execute themselves once with them set.
`FAN_JAX_MALLOC=default` opts out. In a notebook, start Jupyter with `GLIBC_TUNABLES` set
to `TUNABLES` to get the same.

The single arena has a cost: once a process has held those GB-sized blocks, batch-1
inference in it runs about 1.5x slower (9 -> 14 ms after a train step; 2-core AMD EPYC,
3 processes each way, 2026-12-03). The inference entry points (`fan_jax.predict`,
`fan_jax.video`) do not tune malloc, and `benchmarks/run.py` times batch-1 latency before
its training sections.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence

TUNABLES = ":".join(
    [
        "glibc.malloc.arena_max=1",  # one heap: worker threads' big blocks come from it too
        "glibc.malloc.mmap_max=0",  # no mmap per block: freed blocks go back to the heap
        "glibc.malloc.trim_threshold=4294967296",  # keep up to 4 GiB free at the top of the heap
        "glibc.malloc.top_pad=1073741824",  # grow the heap in 1 GiB steps (address space only)
    ]
)
OPT_OUT = "FAN_JAX_MALLOC"  # set to 'default' to leave glibc's malloc alone


def applies() -> bool:
    """True where the settings mean something: Linux with glibc."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def is_tuned(environ: dict | None = None) -> bool:
    env = os.environ if environ is None else environ
    have = set(env.get("GLIBC_TUNABLES", "").split(":"))
    return set(TUNABLES.split(":")) <= have


def tuned_environ(environ: dict | None = None) -> dict:
    """A copy of the environment with `TUNABLES` appended to any GLIBC_TUNABLES already set."""
    env = dict(os.environ if environ is None else environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLES) if t)
    return env


def untuned_environ(environ: dict | None = None) -> dict:
    """A copy of the environment without `TUNABLES` (other GLIBC_TUNABLES kept): what the
    inference entry points run with, for a benchmark's worker that times them."""
    env = dict(os.environ if environ is None else environ)
    ours = set(TUNABLES.split(":"))
    rest = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t not in ours]
    if rest:
        env["GLIBC_TUNABLES"] = ":".join(rest)
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def reexec_tuned(argv: Sequence[str] | None = None) -> None:
    """Replaces this process (same PID, same arguments) by one started with `TUNABLES`.

    Returns without doing anything when they are already in effect, on non-glibc systems and
    when `FAN_JAX_MALLOC=default`. Call it first thing in a `__main__` block.
    """
    if os.environ.get(OPT_OUT) == "default" or is_tuned() or not applies():
        return
    args = list(sys.orig_argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], tuned_environ())
