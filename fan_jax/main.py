"""Command line: `python -m fan_jax.main --config=configs/wflw_distill.py --workdir=DIR`.

Overrides use the config's dotted names (`--config.train.batch_size=32`); the config is
locked, so a misspelt name fails instead of being ignored. `--mode=eval` (or the config's
`mode`) evaluates the workdir's checkpoint instead of training.

On several hosts (a TPU pod slice), run the same command on every host with
`--multihost`; each host reads its own shard of the data.

Exit status (fan_jax.errors): 0 done; 1 an `ERROR:` line (bad config, weight file, data
file, checkpoint or record, I/O error, NaN loss); 2 the dataset is not built and its
downloads are missing; 75 preempted by SIGTERM after saving (requeue the same command).

On Linux the command re-executes itself once with glibc malloc settings that let XLA:CPU
reuse its per-step temporaries (`fan_jax.allocator`; `FAN_JAX_MALLOC=default` opts out).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Before anything else is imported: glibc reads its malloc settings only at start-up.
    from fan_jax import allocator

    allocator.reexec_tuned()

# Experiment configs do `from configs import default`; configs/ sits beside the package
# in a checkout, so make that importable from any working directory.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO_ROOT, "configs")) and _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and eval/ output go here.")
flags.DEFINE_enum("mode", None, ["train", "eval", "demo"], "Overrides config.mode.")
flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() first (pods; set up from the environment).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from fan_jax import errors

    if FLAGS.multihost:
        jax.distributed.initialize()
    config = FLAGS.config
    mode = FLAGS.mode or config.mode
    from fan_jax import train

    logging.info(
        "mode %s, workdir %s, %d process(es), devices %s",
        mode,
        FLAGS.workdir,
        jax.process_count(),
        jax.devices(),
    )
    try:
        if mode == "train":
            result = train.train_and_evaluate(config, FLAGS.workdir)
            preempted = result.preempted
        elif mode == "eval":
            overrides = config_flags.get_override_values(FLAGS["config"])
            train.evaluate_workdir(config, FLAGS.workdir, overrides=overrides)
            preempted = False
        elif mode == "demo":
            from fan_jax import demo

            preempted = demo.run_demo(config, FLAGS.workdir) is None
        else:
            raise app.UsageError(f"unknown mode {mode!r}; expected train, eval or demo")
    except errors.FanJaxError as e:
        _fail(e)
    except OSError as e:  # a read-only or full disk, a missing file: what and where, no trace
        _fail(f"{type(e).__name__}: {e}")
    if preempted:
        print(
            f"\nPREEMPTED: SIGTERM; a checkpoint is saved in {FLAGS.workdir}. Run the same "
            f"command again to resume (exit status {errors.EXIT_PREEMPTED}).",
            file=sys.stderr,
        )
        sys.exit(errors.EXIT_PREEMPTED)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a misspelt `--config.` field or an unreadable config file as
    one `ERROR:` line (ml_collections raises them as tracebacks from inside the parser)."""
    try:
        args = FLAGS(argv)
        getattr(FLAGS.config, "mode", None)  # a config file that failed to load raises here
        return args
    except flags.Error as e:  # absl's own: a bad value or an unknown flag
        print(f"ERROR: {e}\nPass --helpshort to see the flags.", file=sys.stderr)
        sys.exit(1)
    except (AttributeError, KeyError) as e:
        # ml_collections: "'name'\nDid you mean "x" instead of "name"?" for a locked config.
        text = str(e.args[0] if e.args else e).replace("\\n", "\n").replace("\\'", "'").strip("'")
        name, _, hint = text.partition("\n")
        name = name.strip("'\"")
        flag = next(
            (
                a.split("=", 1)[0]
                for a in argv[1:]
                if a.startswith("--config.") and name in a.split("=", 1)[0].split(".")
            ),
            f"--config.<...>.{name}",
        )
        print(f"ERROR: {flag}: the config has no field {name!r}. {hint}".rstrip(), file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # the --config file itself
        print(
            f"ERROR: --config: {' '.join(ln.strip() for ln in str(e).splitlines())}",
            file=sys.stderr,
        )
        sys.exit(1)


def _fail(error: object) -> None:
    from fan_jax import errors

    print(f"\nERROR: {error}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_ERROR)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
