"""One run per workdir: an exclusive OS file lock on the workdir, held for the run's lifetime.

`hold(workdir)` takes `flock(LOCK_EX | LOCK_NB)` on the workdir directory itself (so a run
that then fails its checks leaves no file behind) and writes who holds it (pid, host, start
time) to `<workdir>/.lock`, removed again on release. The kernel drops the lock when the
process dies, so a kill -9 leaves no stale lock, only a stale `.lock` that the next run
overwrites. A second run on the same workdir fails at once with `WorkdirLockedError`, naming
the holder.

Within one process the lock is re-entrant (a demo that trains and then evaluates the same
workdir takes it once). On several hosts only process 0 takes it. Object stores (gs://) have
no file locks: such a workdir is not locked and a warning says so (README, "Workdirs").
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator

from absl import logging

from fan_jax.errors import FanJaxError

LOCK_FILE = ".lock"

# realpath -> depth of the locks this process holds (re-entry).
_HELD: dict[str, int] = {}


class WorkdirLockedError(FanJaxError, RuntimeError):
    """Another process holds the workdir's lock."""


def _holder(path: str, wait_s: float = 1.0) -> str:
    """The holder's details; waits up to `wait_s` for a holder that has just taken the lock
    to write them (until then the file is absent, or a dead run's)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path) as f:
                info = json.load(f)
            pid = int(info.get("pid"))
            if info.get("host") != socket.gethostname() or _alive(pid):
                return (
                    f"pid {pid} on host {info.get('host')}, {info.get('what', 'a run')} "
                    f"since {info.get('since')}"
                )
        except (OSError, ValueError, TypeError):
            pass
        if time.monotonic() > deadline:
            return "a process whose details could not be read"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def hold(workdir: str, what: str = "training", create: bool = True) -> Iterator[None]:
    """Holds `workdir`'s lock inside the block; raises WorkdirLockedError if another has it.
    With `create=False` a missing workdir is not made (a reader then fails on its own)."""
    import jax

    if "://" in workdir:
        logging.warning(
            "%s is not on a local filesystem: it cannot be locked, so nothing stops "
            "a second run from writing into it at the same time.",
            workdir,
        )
        yield
        return
    if jax.process_index() != 0 or not (create or os.path.isdir(workdir)):
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    key = os.path.realpath(workdir)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    import fcntl

    fd = os.open(workdir, os.O_RDONLY)
    info = os.path.join(workdir, LOCK_FILE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirLockedError(
                f"{workdir} is in use by another run ({_holder(info)}). Wait for it to finish, "
                f"or use another --workdir. Nothing was read or written."
            ) from None
        _write_holder(info, what)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.remove(info)
    finally:
        os.close(fd)  # releases the flock


def _write_holder(path: str, what: str) -> None:
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "what": what,
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
                f,
            )
        os.replace(path + ".tmp", path)
    except OSError as e:  # a read-only workdir: still locked, only unnamed
        logging.warning("could not write %s (%s); the lock is held all the same", path, e)
