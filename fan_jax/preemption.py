"""SIGTERM as a request to stop: the training loop saves at the next step boundary and returns.

On pods every host must stop at the same step, so hosts compare their flags (a collective)
only every `check_every` steps.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging


class Preemption:
    """SIGTERM sets a flag; the loop saves at the next step boundary and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading_is_main():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def stop_now(self, step: int, check_every: int) -> bool:
        """Whether to save and stop before `step`. On pods every host must reach the same
        decision, so hosts only compare flags every `check_every` steps."""
        if jax.process_count() > 1 and step % check_every:
            return False
        return self.any_host()

    def any_host(self) -> bool:
        """Whether any host was asked to stop (a collective on pods: call at the same steps)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))


def threading_is_main() -> bool:
    return threading.current_thread() is threading.main_thread()
