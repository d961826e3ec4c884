"""The project's own error types and the exit codes the CLIs give them.

Every error fan_jax raises for bad input (a config field, a weight file, a dataset file, a
checkpoint that does not fit, a run record that disagrees) derives from `FanJaxError`, so
the command lines can print it as one `ERROR: ...` line; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

# Exit codes of `python -m fan_jax.main` (README, "Exit status").
EXIT_OK = 0
EXIT_ERROR = 1  # an ERROR: line: config, record, checkpoint, weights, data, I/O, NaN loss
EXIT_DATASET_MISSING = 2  # the dataset is not built and its downloads are missing
EXIT_PREEMPTED = 75  # SIGTERM: saved a checkpoint, run the same command again (EX_TEMPFAIL)


class FanJaxError(Exception):
    """Base of the errors that reach the user as one line (their message says what to fix)."""


class ConfigError(FanJaxError, ValueError):
    """The config has invalid values; the message lists every problem found, one per line."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(
            "invalid config:\n  " + "\n  ".join(self.problems)
            if len(self.problems) > 1
            else f"invalid config: {self.problems[0]}"
        )


class RecordMismatchError(FanJaxError, ValueError):
    """A rerun or a reader disagrees with the workdir's record (its config.json)."""


class CheckpointMismatchError(FanJaxError, ValueError):
    """A checkpoint's parameter tree does not fit the model (names the first differing path)."""


class TeacherError(FanJaxError, RuntimeError):
    """A teacher a run distils from is missing, of another dataset, or does not fit."""


class NonFiniteLossError(FanJaxError, FloatingPointError):
    """A NaN or Inf loss: training stopped before saving anything past the last good step."""


class CheckpointSaveError(FanJaxError, OSError):
    """Writing a checkpoint failed (a full disk, a lost mount); the last good one is intact."""
