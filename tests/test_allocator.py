"""fan_jax.allocator: the CLI re-executes itself with glibc malloc settings under which a
large XLA buffer freed by one call is reused by the next instead of page-faulted in again.
(The speed effect is measured by benchmarks/run.py, which runs under the same settings.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fan_jax import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not allocator.applies(), reason="glibc malloc settings only")


def test_reexec_sets_the_tunables_once_and_opts_out():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT)}
    code = (
        "import os; from fan_jax import allocator; allocator.reexec_tuned(); allocator.reexec_tuned();"
        "print(os.environ.get('GLIBC_TUNABLES'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    ).stdout.strip()
    assert out == allocator.TUNABLES  # set once, not appended again by the second call
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**env, allocator.OPT_OUT: "default"},
    ).stdout.strip()
    assert out == "None"


def test_tuned_environ_keeps_existing_tunables():
    env = allocator.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "X": "1"})
    assert env["GLIBC_TUNABLES"].startswith("glibc.malloc.tcache_count=0:")
    assert allocator.is_tuned(env) and env["X"] == "1"
    assert not allocator.is_tuned({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})


def test_cli_runs_under_the_tunables(tmp_path):
    """`python -m fan_jax.main` re-executes itself (same PID) before it loads the config: the
    config file, run at flag parsing, sees the tunables."""
    seen = tmp_path / "seen.json"
    config = tmp_path / "probe_config.py"
    config.write_text(
        "import json, os\n"
        f"json.dump({{'pid': os.getpid(), 'tunables': os.environ.get('GLIBC_TUNABLES')}}, open({str(seen)!r}, 'w'))\n"
        "raise SystemExit(0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fan_jax.main", f"--config={config}", f"--workdir={tmp_path / 'w'}"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    got = json.loads(seen.read_text())
    assert got["pid"] == proc.pid and allocator.is_tuned({"GLIBC_TUNABLES": got["tunables"]})


def test_untuned_environ_drops_only_ours():
    env = allocator.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "X": "1"})
    back = allocator.untuned_environ(env)
    assert back["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0" and back["X"] == "1"
    assert "GLIBC_TUNABLES" not in allocator.untuned_environ(allocator.tuned_environ({}))


def test_benchmark_workers_run_with_the_applications_malloc(monkeypatch):
    """The e2e and video workers time inference as `fan_jax.predict` runs it (no tunables),
    though `benchmarks/run.py` itself runs under them; training workers keep them."""
    from benchmarks import harness

    monkeypatch.setenv("GLIBC_TUNABLES", allocator.TUNABLES)
    seen = harness.run_in_process("os", "getenv", "GLIBC_TUNABLES", "probe")
    assert seen is None
    seen = harness.run_in_process("os", "getenv", "GLIBC_TUNABLES", "probe", malloc="inherit")
    assert allocator.is_tuned({"GLIBC_TUNABLES": seen})
