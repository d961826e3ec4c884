"""Test-session settings shared by every xdist worker and every CLI subprocess."""

import os
import tempfile

# XLA:CPU compiles are most of the suite's time, and many tests compile the same programs:
# the student's train step at the test sizes, the CLI's step in a subprocess, and the
# thousands of one-op programs an eager `model.init` runs (~20 s per process for MobileFAN,
# ~5 s from the cache). One persistent compilation cache per test session, handed to the
# workers and subprocesses by the environment, lets each distinct program compile once.
# The cache keys on the HLO, the flags and the jax version, so a hit is the same
# executable. A caller's own JAX_COMPILATION_CACHE_DIR wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fan_jax_test_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    _CREATED_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _CREATED_CACHE = None


def pytest_unconfigure(config) -> None:
    # The controller (not an xdist worker) removes the cache it made once the session ends.
    if _CREATED_CACHE and not hasattr(config, "workerinput"):
        import shutil

        shutil.rmtree(_CREATED_CACHE, ignore_errors=True)
