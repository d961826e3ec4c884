"""What a training run tells a person: progress times, TensorBoard scalars, quiet library logs."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax
from absl import logging


def quiet_library_logs() -> None:
    """Drops orbax's per-save INFO chatter from the absl log; warnings still pass."""
    import logging as py_logging

    noise = ("tracked_metric", "read only", "read_only=True", "Waiting for previous save")

    def keep(record: py_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        if record.levelno >= py_logging.ERROR:
            # A failed save reaches the user as one CheckpointSaveError; orbax's threads each
            # log it with a traceback first. Keep their one-line messages only.
            record.exc_info = record.exc_text = None
            return True
        if record.levelno < py_logging.WARNING:
            return False
        msg = str(record.msg)
        return record.levelno > py_logging.WARNING or not any(n in msg for n in noise)

    absl_logger = logging.get_absl_logger()
    if not any(getattr(f, "_fan_jax", False) for f in absl_logger.filters):
        keep._fan_jax = True  # type: ignore[attr-defined]
        absl_logger.addFilter(keep)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Writer:
    """TensorBoard scalars from process 0 (no-op elsewhere)."""

    def __init__(self, workdir: str):
        self._w = None
        if jax.process_index() == 0:
            from flax.metrics import tensorboard

            self._w = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._w is not None:
            for k, v in values.items():
                self._w.scalar(k, v, step)

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
