"""Training loop: mesh, state, teacher, checkpoints, logging; `train_and_evaluate(config, workdir)`.

One code path for 1 CPU, the 8 cores of a TPU host and many hosts: the step is jitted over
a 1-D `Mesh` with a 'batch' axis; the state (and the teacher) are replicated, batches are
sharded `P('batch')`, and each host feeds only its own examples through
`jax.make_array_from_process_local_data`. With jit over the global batch, BatchNorm sees
the statistics of the whole global batch, so N devices compute the same step as one.

Checkpoints (orbax, `<workdir>/checkpoints/<step>/`) hold three items:
  'model': {'params', 'batch_stats'} of the student (and its KD adapters), what a teacher
           load, evaluation and export read;
  'opt':   {'step', 'opt_state'};
  'data':  the grain iterator state (one JSON per host), so a resumed run sees exactly the
           batches the uninterrupted one would have.
The latest `train.keep_checkpoints` are kept, plus the best by validation NME.

Faults: SIGTERM (preemption) saves and returns; a NaN/Inf loss raises
`NonFiniteLossError` naming the step, before anything past the last good checkpoint is
saved. Losses are fetched from the device only at log/checkpoint boundaries, so the
check costs no per-step host sync.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fan_jax import checkpoints, errors, geometry, input_pipeline, steps, validate
from fan_jax.models import fan

PyTree = Any
Source = Sequence[Mapping[str, Any]]

CHECKPOINT_DIR = checkpoints.CHECKPOINT_DIR
CONFIG_FILE = checkpoints.CONFIG_FILE
CheckpointMismatchError = errors.CheckpointMismatchError


class NonFiniteLossError(errors.FanJaxError, FloatingPointError):
    """The loss became NaN or Inf; the message names the step."""


class TeacherError(errors.FanJaxError, RuntimeError):
    """The distillation teacher is missing or does not fit this run."""


@dataclasses.dataclass
class TrainResult:
    state: steps.TrainState
    step: int
    preempted: bool
    val_nme: float | None
    eval_results: dict | None


# --------------------------------------------------------------------------- data


def dataset_spec(name: str) -> tuple[str, int, tuple[str, ...]]:
    """(TFDS name, number of landmarks, test splits) of 'wflw' | '300w' | 'cofw'."""
    from fan_jax import data

    spec = data.get(name)
    return spec.tfds_name, spec.num_landmarks, spec.test_splits


def ensure_dataset(config: ml_collections.ConfigDict) -> None:
    """Builds the configured TFDS dataset from `dataset.manual_dir` unless it is built.

    Missing downloads: prints the builder's download instructions and exits non-zero.
    """
    from fan_jax import data

    # On several hosts one builds (they share data_dir) while the others wait for it.
    if jax.process_index() == 0:
        try:
            data.prepare(config.dataset.name, data_dir=config.dataset.data_dir or None,
                         manual_dir=config.dataset.manual_dir or None)
        except data.DatasetFilesMissing as e:
            print(f"\nThe {config.dataset.name} dataset is not built yet and its downloaded "
                  f"files are missing.\n\n{e}", file=sys.stderr, flush=True)
            sys.exit(2)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fan_jax dataset prepared")


def load_sources(config: ml_collections.ConfigDict, splits: Sequence[str]) -> dict[str, Source]:
    """Random-access TFDS array_record sources, one per split."""
    from fan_jax import data

    return {s: data.data_source(config.dataset.name, s, config.dataset.data_dir or None)
            for s in dict.fromkeys(splits)}


def eval_splits(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    from fan_jax import data

    return tuple(config.eval.splits) or data.get(config.dataset.name).test_splits


# --------------------------------------------------------------------------- models, state


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("batch",))


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam with the step decay of the paper (x0.1 at epochs 30 and 50 by default)."""
    t = config.train
    boundaries = {int(round(e * steps_per_epoch)): t.lr_decay_factor for e in t.lr_decay_epochs}
    schedule = optax.piecewise_constant_schedule(t.learning_rate, boundaries)
    warmup = int(t.get("warmup_steps", 0))
    if warmup > 0:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, t.learning_rate, warmup), schedule], [warmup])
    return optax.adam(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.get("adam_eps", 1e-8)), schedule


# Init runs once, but its hundreds of RNG draws take XLA's CPU backend longer to optimise
# than the train step; unoptimised code is as correct and compiles in half the time.
_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run_once(fn: Callable, *args: Any) -> Any:
    lowered = jax.jit(fn).lower(*args)
    try:
        compiled = lowered.compile(_RUN_ONCE_OPTIONS)
    except Exception:  # noqa: BLE001  (a backend without these options: compile as usual)
        compiled = lowered.compile()
    return compiled(*args)


def init_variables(config: ml_collections.ConfigDict, model: fan.FAN, adapters: fan.Adapters | None,
                   rng: jax.Array) -> tuple[PyTree, PyTree]:
    """(params, batch_stats) as {'student': ..., 'adapters': ...}, on the host's default device."""
    s = config.input_size
    images = jnp.zeros((1, s, s, 3), jnp.float32)
    k_model, k_adapt = jax.random.split(rng)
    variables = dict(_run_once(functools.partial(model.init, train=False), k_model, images))
    if config.model.pretrained:
        from fan_jax import pretrained

        logging.info("Initialising the %s encoder from %s", pretrained.describe(model.encoder),
                     config.model.pretrained)
        variables = pretrained.init_encoder_from_keras(model, variables, config.model.pretrained)
    params = {"student": variables["params"]}
    batch_stats = {"student": variables.get("batch_stats", {})}
    if adapters is not None:
        _, taps = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
        taps = tuple(jnp.zeros(t.shape, t.dtype) for t in taps)
        avars = _run_once(functools.partial(adapters.init, train=False), k_adapt, taps)
        params["adapters"] = avars["params"]
        if "batch_stats" in avars:
            batch_stats["adapters"] = avars["batch_stats"]
    return params, batch_stats


def _model_item(state: steps.TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def _opt_item(state: steps.TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state}


def student_variables(state: steps.TrainState) -> dict:
    """The deployable student: {'params', 'batch_stats'} without the KD adapters."""
    return {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}


def _abstract(tree: PyTree, sharding: NamedSharding) -> PyTree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding),
                        tree)


# --------------------------------------------------------------------------- checkpoints

checkpoint_manager = checkpoints.manager
_select_step = checkpoints.select_step
_check_tree_matches = checkpoints.check_tree_matches
_to_dict = checkpoints.to_dict
_read_run_config = checkpoints.read_record



def restore_model_variables(workdir: str, which: str = "best", *, expected: PyTree | None = None,
                            sharding: NamedSharding | None = None) -> tuple[dict, int]:
    """Restores the 'model' item ({'params', 'batch_stats'}) of a run; returns it and its step.

    With `expected` (a tree of arrays or shape structs) the checkpoint must match it exactly;
    without, whatever the checkpoint holds is restored. Arrays come back replicated over
    `sharding`'s mesh (default: all devices), whatever device count saved them.
    """
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"no checkpoints in {directory}")
    sharding = sharding or NamedSharding(make_mesh(), P())
    mngr = checkpoint_manager(directory, read_only=True)
    try:
        step = _select_step(mngr, which)
        if step is None:
            raise FileNotFoundError(f"no checkpoints in {directory}")
        meta = _to_dict(mngr.item_metadata(step)["model"])
        if expected is not None:
            _check_tree_matches(meta, expected, f"checkpoint {directory}/{step}")
        target = _abstract(expected if expected is not None else meta, sharding)
        restored = mngr.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(target)))["model"]
    finally:
        mngr.close()
    return restored, step


def teacher_run_config(config: ml_collections.ConfigDict) -> dict:
    """The saved config of the teacher run named by `config.distill`, checked for fit.

    Cheap (no JAX), so a run fails on a missing teacher before building any dataset.
    Errors name the command that trains the teacher.
    """
    d = config.distill
    workdir = d.teacher_workdir
    train_cmd = (f"python -m fan_jax.main --config={d.teacher_config or 'configs/<dataset>_teacher.py'}"
                 f" --workdir={workdir or '<teacher workdir>'}")
    if not workdir:
        raise TeacherError("distill.enabled is set but distill.teacher_workdir is empty. Train a "
                           f"teacher and point to it:\n  {train_cmd}\n  then "
                           "--config.distill.teacher_workdir=<that workdir>")
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    run_config = _read_run_config(workdir)
    ckpt_dir = epath.Path(directory)
    has_ckpt = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if run_config is None or not has_ckpt:
        where = workdir if "://" in workdir else os.path.abspath(workdir)
        raise TeacherError(f"No teacher checkpoint in {where}. "
                           f"Train the teacher first:\n  {train_cmd}")
    teacher_ds = run_config["dataset"]["name"]
    if teacher_ds != config.dataset.name:
        raise TeacherError(f"the teacher in {workdir} was trained on {teacher_ds!r}, this run "
                           f"trains on {config.dataset.name!r}: its heatmaps and landmarks do not "
                           f"match. Train a {config.dataset.name} teacher:\n  {train_cmd}")
    if run_config.get("distill", {}).get("enabled"):
        raise TeacherError(f"{workdir} holds a distilled student, not a teacher "
                           f"(its config has distill.enabled=True). Train the teacher:\n  {train_cmd}")
    return run_config


def load_teacher(config: ml_collections.ConfigDict, num_landmarks: int,
                 sharding: NamedSharding | None = None) -> tuple[fan.FAN, dict]:
    """The frozen teacher named by `config.distill`: (model, {'params', 'batch_stats'}).

    The architecture comes from the teacher run's saved config, so any model in the
    registry can teach.
    """
    d = config.distill
    workdir = d.teacher_workdir
    run_config = teacher_run_config(config)
    teacher = fan.build_model(run_config["model"]["name"], num_landmarks)
    s = config.input_size
    expected = jax.eval_shape(functools.partial(teacher.init, train=False), jax.random.key(0),
                              jnp.zeros((1, s, s, 3), jnp.float32))
    expected = {"params": {"student": expected["params"]},
                "batch_stats": {"student": expected.get("batch_stats", {})}}
    try:
        restored, step = restore_model_variables(workdir, d.teacher_checkpoint,
                                                 expected=expected,
                                                 sharding=sharding)
    except CheckpointMismatchError as e:
        raise TeacherError(f"the teacher checkpoint in {workdir} does not match model "
                           f"{run_config['model']['name']!r} with {num_landmarks} landmarks: {e}"
                           ) from None
    logging.info("Teacher %r from %s, step %d", run_config["model"]["name"], workdir, step)
    return teacher, {"params": restored["params"]["student"],
                     "batch_stats": restored["batch_stats"]["student"]}


# --------------------------------------------------------------------------- evaluation


class Predictor:
    """Host-local heatmap predictor for `fan_jax.evaluate`: uint8 images -> heatmaps (numpy).

    Runs data parallel over this host's devices only, so evaluation needs no collective:
    on a pod every host scores the full split and they agree. Compiled once per model;
    `predictor(variables)` gives the images -> heatmaps function evaluate expects.
    """

    def __init__(self, model: fan.FAN):
        local = jax.local_devices()
        mesh = Mesh(np.asarray(local), ("batch",))
        self._repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
        self._n_dev = len(local)
        self._fn = jax.jit(functools.partial(steps.predict_heatmaps, model=model),
                           in_shardings=(self._repl, data), out_shardings=data)

    def __call__(self, variables: PyTree) -> Callable[[np.ndarray], np.ndarray]:
        # A replicated global array is not addressable as a whole on a pod: take this
        # host's copy.
        host_vars = jax.tree.map(
            lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, variables)
        host_vars = jax.device_put(host_vars, self._repl)

        def predict(images: np.ndarray) -> np.ndarray:
            images = np.asarray(images)
            n = len(images)
            pad = (-n) % self._n_dev
            if pad:
                images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
            return np.asarray(self._fn(host_vars, images))[:n]

        return predict


def _eval_batches_fn(config: ml_collections.ConfigDict, source: Source) -> Callable:
    a = config.augment
    return lambda: input_pipeline.eval_batches(
        source, config.eval.batch_size, output_size=config.input_size, box_source=a.box_source,
        box_scale=a.box_scale, shard_index=0, shard_count=1)


def validation_nme(config: ml_collections.ConfigDict, predictor: Predictor, variables: PyTree,
                   source: Source) -> float:
    """Mean NME (fraction, no flip-test) on the validation split, via fan_jax.evaluate."""
    from fan_jax import evaluate

    predict = predictor(variables)
    split = config.dataset.val_split
    res = evaluate.evaluate_splits(predict, {split: _eval_batches_fn(config, source)},
                                   config.dataset.name, config.eval.normalizer, flip_perm=None)
    return float(res[split]["no_flip"]["nme"])


def run_evaluation(config: ml_collections.ConfigDict, workdir: str, variables: PyTree,
                   sources: Mapping[str, Source] | None = None) -> dict:
    """Scores every test split; writes <workdir>/eval/metrics.json and plots; returns results."""
    from fan_jax import evaluate

    if sources is None and hasattr(evaluate, "evaluate"):
        return evaluate.evaluate(config, workdir, variables)
    # Local composition of the same pieces (in-memory sources, or before evaluate() exists).
    if sources is None:
        splits = eval_splits(config)
        sources = load_sources(config, splits)
    else:
        splits = tuple(config.eval.splits) or tuple(k for k in sources if k != "train")
    num_landmarks = _num_landmarks(config, sources)
    model = fan.build_model(config.model.name, num_landmarks)
    predict = Predictor(model)(variables)
    flip_perm = geometry.flip_permutation(num_landmarks) if config.eval.flip_test else None
    out_dir = os.path.join(workdir, "eval") if jax.process_index() == 0 else None
    results = evaluate.evaluate_splits(
        predict, {s: _eval_batches_fn(config, sources[s]) for s in splits}, config.dataset.name,
        config.eval.normalizer, flip_perm, out_dir=out_dir, model_name=run_label(config))
    if jax.process_index() == 0:
        print(evaluate.format_table({run_label(config): results}), flush=True)
    return results


def run_label(config: ml_collections.ConfigDict) -> str:
    """'mobilefan', 'mobilefan+KD', ... for tables and plot titles."""
    return config.model.name + ("+KD" if config.distill.enabled else "")


def _num_landmarks(config: ml_collections.ConfigDict, sources: Mapping[str, Source] | None) -> int:
    if sources:
        first = next(iter(sources.values()))
        return int(np.asarray(first[0]["landmarks"]).shape[0])
    from fan_jax import data

    return data.get(config.dataset.name).num_landmarks


# --------------------------------------------------------------------------- logging


class _Preemption:
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


def quiet_library_logs() -> None:
    """Drops orbax's per-save INFO chatter from the absl log; warnings still pass."""
    import logging as py_logging

    noise = ("tracked_metric", "read only", "read_only=True", "Waiting for previous save")

    def keep(record: py_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        if record.levelno < py_logging.WARNING:
            return False
        msg = str(record.msg)
        return record.levelno > py_logging.WARNING or not any(n in msg for n in noise)

    absl_logger = logging.get_absl_logger()
    if not any(getattr(f, "_fan_jax", False) for f in absl_logger.filters):
        keep._fan_jax = True  # type: ignore[attr-defined]
        absl_logger.addFilter(keep)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class _Writer:
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


# --------------------------------------------------------------------------- loop


def augment_settings(config: ml_collections.ConfigDict) -> dict:
    """The input pipeline's AugmentConfig fields for this run."""
    return dict(config.augment.to_dict(), output_size=config.input_size)


def steps_per_epoch(config: ml_collections.ConfigDict, num_train: int) -> int:
    return max(1, num_train // config.train.batch_size)


def _every(value: int, steps_per_epoch: int) -> int:
    """Config interval: > 0 steps; 0 once per epoch; < 0 never."""
    if value < 0:
        return 0
    return value or steps_per_epoch


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        checkpoints.write_record(config, workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       sources: Mapping[str, Source] | None = None,
                       evaluate_at_end: bool = True) -> TrainResult:
    """Trains (resuming from `workdir` when it has checkpoints), then evaluates the test splits.

    `sources` ({split: random-access source}) replaces the TFDS dataset (tests, demos).
    SIGTERM from here on saves a checkpoint at the next step boundary and returns.
    """
    quiet_library_logs()
    with _Preemption() as preemption:
        return _train_and_evaluate(config, workdir, sources, evaluate_at_end, preemption)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        sources: Mapping[str, Source] | None, evaluate_at_end: bool,
                        preemption: _Preemption) -> TrainResult:
    t = config.train
    mesh = make_mesh()
    n_dev = mesh.devices.size
    # Before anything is read or written: bad values, and a rerun that disagrees with the
    # workdir's record, fail here with the workdir untouched.
    validate.check(config, num_devices=n_dev)
    changes = checkpoints.check_rerun(config, workdir)
    if config.distill.enabled:
        teacher_run_config(config)  # fail before building datasets or compiling
    if sources is None:
        if config.dataset.prepare:
            ensure_dataset(config)
        sources = load_sources(config, ("train", config.dataset.val_split))
    num_landmarks = _num_landmarks(config, sources)
    train_source = sources["train"]
    repl = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("batch"))

    epoch_steps = steps_per_epoch(config, len(train_source))
    num_steps = t.num_train_steps if t.num_train_steps > 0 else t.num_epochs * epoch_steps
    tx, schedule = make_optimizer(config, epoch_steps)

    model = fan.build_model(config.model.name, num_landmarks)
    teacher = adapters = teacher_vars = None
    d = config.distill
    if d.enabled:
        teacher, teacher_vars = load_teacher(config, num_landmarks, sharding=repl)
        if any(d.fa_layers):
            adapters = fan.Adapters(features=fan.teacher_channels(teacher), kind=d.adapter_kind)

    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    params, batch_stats = init_variables(config, model, adapters, init_rng)
    state = jax.jit(functools.partial(steps.create_train_state, tx=tx), out_shardings=repl)(
        params, batch_stats)

    train_iter = input_pipeline.train_iterator(
        train_source, num_landmarks, seed=config.seed, global_batch_size=t.batch_size,
        augment=augment_settings(config),
        num_workers=config.dataset.num_workers)

    mngr = checkpoint_manager(os.path.join(workdir, CHECKPOINT_DIR), keep=t.keep_checkpoints)
    state, train_iter = checkpoints.resume(mngr, state, train_iter, repl)
    checkpoints.commit_record(config, workdir, changes)  # the model is built and fits

    if d.enabled:
        step_fn = functools.partial(
            steps.distill_step, model=model, adapters=adapters, teacher=teacher, tx=tx,
            sigma=config.sigma, lam=d.lam, fa_layers=tuple(d.fa_layers),
            fs_layers=tuple(d.fs_layers), fs_form=d.fs_form)
        jitted = jax.jit(step_fn, in_shardings=(repl, repl, data_sharding, repl),
                         out_shardings=(repl, repl), donate_argnums=(0,))
        train_step = lambda s, b, r: jitted(s, teacher_vars, b, r)  # noqa: E731
    else:
        step_fn = functools.partial(steps.train_step, model=model, tx=tx, sigma=config.sigma)
        train_step = jax.jit(step_fn, in_shardings=(repl, data_sharding, repl),
                             out_shardings=(repl, repl), donate_argnums=(0,))

    val_source = sources.get(config.dataset.val_split)
    eval_every = _every(t.eval_every_steps, epoch_steps) if val_source is not None else 0
    ckpt_every = _every(t.checkpoint_every_steps, epoch_steps)
    log_every = max(1, t.log_every_steps)
    writer = _Writer(workdir)
    predictor = Predictor(model) if eval_every else None
    step = int(jax.device_get(state.step.addressable_data(0)))
    start_step = step
    pending: list[tuple[int, dict]] = []  # device metrics not yet checked or logged
    last_val: float | None = None
    preempted = False
    t_start = t_log = time.perf_counter()
    step_log = step
    logging.info("Training %s on %s: %d steps (%d per epoch), global batch %d on %d device(s), "
                 "%d host(s)", config.model.name, config.dataset.name, num_steps, epoch_steps,
                 t.batch_size, n_dev, jax.process_count())

    def flush() -> None:
        """Fetches pending metrics: raises on NaN/Inf, else logs their mean."""
        nonlocal t_log, step_log
        if not pending:
            return
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending.clear()
        for s, m in fetched:
            bad = {k: v for k, v in m.items() if not math.isfinite(v)}
            if bad:
                mngr.wait_until_finished()
                good = mngr.latest_step()
                raise NonFiniteLossError(
                    f"non-finite loss at step {s}: {bad}. Stopped; the last good checkpoint "
                    f"({'step ' + str(good) if good is not None else 'none'}) in "
                    f"{mngr.directory} is intact.")
        now = time.perf_counter()
        rate = {}
        if step > step_log:
            sps = (step - step_log) / max(now - t_log, 1e-9)
            rate = {"train/steps_per_sec": sps}
            speed = f"{sps:.2f} steps/s | ETA {_format_eta((num_steps - step) / sps)}"
        else:
            speed = "compiled"
        means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        lr = float(schedule(step))
        terms = " ".join(f"{k} {v:.3g}" for k, v in means.items() if k != "loss")
        if jax.process_index() == 0:
            logging.info("step %d/%d | loss %.5g (%s) | lr %.2g | %s", step, num_steps,
                         means["loss"], terms, lr, speed)
        writer.scalars(step, {**{f"train/{k}": v for k, v in means.items()},
                              "train/learning_rate": lr, **rate})
        t_log, step_log = now, step

    def save(metrics: dict | None) -> None:
        if step in mngr.all_steps():
            return
        mngr.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(_model_item(state)),
            opt=ocp.args.StandardSave(_opt_item(state)),
            data=grain.checkpoint.CheckpointSave(train_iter)), metrics=metrics, force=True)

    try:
        while step < num_steps:
            if preemption.stop_now(step, log_every):
                flush()
                save(None)
                preempted = True
                logging.warning("Preempted: saved step %d in %s", step, mngr.directory)
                break
            batch = next(train_iter)
            local = {"image": batch["image"], "landmarks": batch["landmarks"]}
            if step + 1 == t.nan_at_step:
                local["landmarks"] = np.full_like(local["landmarks"], np.nan)
            global_batch = {k: jax.make_array_from_process_local_data(data_sharding, v)
                            for k, v in local.items()}
            state, metrics = train_step(state, global_batch, step_rng)
            step += 1
            if step == start_step + 1:
                # Keep compilation out of the steps/s and ETA figures.
                jax.block_until_ready(metrics)
                if jax.process_index() == 0:
                    logging.info("first step (with compilation) took %.1fs",
                                 time.perf_counter() - t_log)
                t_log, step_log = time.perf_counter(), step
            pending.append((step, metrics))
            is_last = step == num_steps
            do_eval = bool(eval_every) and (is_last or step % eval_every == 0)
            do_ckpt = do_eval or is_last or (ckpt_every and step % ckpt_every == 0)
            if step % log_every == 0 or do_ckpt or is_last:
                flush()
            val_metrics = None
            if do_eval:
                t_eval = time.perf_counter()
                last_val = validation_nme(config, predictor, student_variables(state),
                                          val_source)
                t_log += time.perf_counter() - t_eval  # keep validation out of steps/s
                val_metrics = {"val_nme": last_val}
                writer.scalars(step, {f"val/nme_{config.dataset.val_split}": last_val})
                if jax.process_index() == 0:
                    logging.info("step %d | val NME (%s, %s) %.3f%%", step,
                                 config.dataset.val_split, config.eval.normalizer,
                                 100 * last_val)
            if do_ckpt:
                save(val_metrics)
        else:
            flush()
            save(None)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.flush()
        writer.close()
        close = getattr(train_iter, "close", None)
        if close is not None:
            close()

    elapsed = time.perf_counter() - t_start
    if jax.process_index() == 0:
        logging.info("Stopped at step %d after %d steps in %.1fs", step, step - start_step, elapsed)
    results = None
    if evaluate_at_end and not preempted:
        variables = student_variables(state)
        if config.eval.checkpoint != "latest":
            variables = _restore_student(config, workdir, config.eval.checkpoint, state, repl)
        results = run_evaluation(config, workdir, variables,
                                 sources=None if _is_tfds(sources) else sources)
    return TrainResult(state=state, step=step, preempted=preempted, val_nme=last_val,
                       eval_results=results)


def _is_tfds(sources: Mapping[str, Source]) -> bool:
    return all(type(s).__module__.startswith("tensorflow_datasets") for s in sources.values())


def _restore_student(config, workdir, which, state, sharding) -> dict:
    restored, step = restore_model_variables(workdir, which, expected=_model_item(state),
                                             sharding=sharding)
    logging.info("Evaluating the %s checkpoint (step %d)", which, step)
    return {"params": restored["params"]["student"],
            "batch_stats": restored["batch_stats"]["student"]}


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *,
                     sources: Mapping[str, Source] | None = None,
                     overrides: Mapping[str, Any] | None = None) -> dict:
    """Eval mode: restores `config.eval.checkpoint` of `workdir` and scores the test splits.

    The model and data settings come from the workdir's record, not from `config`; an entry
    of `overrides` (the command line's) that contradicts the record is an error."""
    quiet_library_logs()
    config = checkpoints.config_from_record(config, workdir, overrides)
    validate.check(config)
    if sources is None and config.dataset.prepare:
        ensure_dataset(config)
    num_landmarks = _num_landmarks(config, sources)
    model = fan.build_model(config.model.name, num_landmarks)
    s = config.input_size
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, s, s, 3), jnp.float32))
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"no checkpoints in {directory}; train first:\n  python -m "
                                f"fan_jax.main --config=<config> --workdir={workdir}")
    mngr = checkpoint_manager(directory, read_only=True)
    try:
        step = _select_step(mngr, config.eval.checkpoint)
        if step is None:
            raise FileNotFoundError(f"no checkpoints in {directory}")
        meta = mngr.item_metadata(step)["model"]
    finally:
        mngr.close()
    # The checkpoint may also hold KD adapters; restore what is there, use the student.
    expected = {"params": {"student": shapes["params"]},
                "batch_stats": {"student": shapes.get("batch_stats", {})}}
    meta = _to_dict(meta)
    _check_tree_matches({k: {"student": meta[k]["student"]} for k in ("params", "batch_stats")},
                        expected, f"checkpoint {directory}/{step}")
    restored, _ = restore_model_variables(workdir, str(step))
    variables = {"params": restored["params"]["student"],
                 "batch_stats": restored["batch_stats"]["student"]}
    return run_evaluation(config, workdir, variables, sources=sources)


# --------------------------------------------------------------------------- demo


def _demo_log(t0: float, msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[demo {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)


def demo_configs(config: ml_collections.ConfigDict, workdir: str
                 ) -> dict[str, tuple[str, ml_collections.ConfigDict]]:
    """{label: (run dir, config)} for the demo's teacher, MobileFAN and MobileFAN + KD.

    The learning rate is constant: with schedule boundaries baked into the compiled step,
    per-stage schedules would make the teacher's and MobileFAN's steps different programs,
    and the second could not come from the compilation cache.
    """
    d = config.demo

    def derive(model: str, steps_: int, distill: bool) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict(config.to_dict())
        c.mode = "train"
        c.model.name = model
        c.train.num_train_steps = steps_
        c.train.lr_decay_epochs = ()
        c.distill.enabled = distill
        c.distill.teacher_workdir = os.path.join(workdir, "teacher")
        c.distill.teacher_config = "configs/demo.py (its teacher stage)"
        return c

    return {
        "teacher": ("teacher", derive(d.teacher_model, d.teacher_steps, False)),
        "MobileFAN": ("mobilefan", derive(config.model.name, d.student_steps, False)),
        "MobileFAN + KD": ("mobilefan_kd", derive(config.model.name, d.student_steps, True)),
    }


def _plot_demo(rows: Mapping[str, dict], path: str, splits: Sequence[str]) -> None:
    # A bare Figure renders to files without pyplot, leaving the caller's backend alone
    # (a notebook's inline plots keep working).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.subplots()
    width = 0.8 / max(1, len(rows))
    for i, (label, res) in enumerate(rows.items()):
        vals = [100 * res[s]["flip" if "flip" in res[s] else "no_flip"]["nme"] for s in splits]
        ax.bar(np.arange(len(splits)) + i * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(splits)) + width * (len(rows) - 1) / 2, splits)
    ax.set_ylabel("NME (%, inter-ocular)")
    ax.set_title("Synthetic 300W: heatmap KD (MobileFAN) and KD-Loss (regression)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def demo_kdloss_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """The demo's KD-Loss config (`config.demo.kdloss`), reading the demo's built 300W data."""
    kd = config.demo.get("kdloss")
    if kd is None or not config.demo.get("kdloss_enabled", True):
        return None
    kd = ml_collections.ConfigDict(kd.to_dict())
    kd.dataset.name = config.dataset.name
    kd.dataset.data_dir, kd.dataset.manual_dir = config.dataset.data_dir, config.dataset.manual_dir
    kd.dataset.prepare = False
    kd.dataset.val_split = config.dataset.val_split
    kd.eval.splits = tuple(config.eval.splits)
    kd.seed = config.seed
    return kd


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict] | None:
    """The whole pipeline on synthetic faces: draw a 300W-layout tree, build it with the 300W
    TFDS builder, train a teacher, MobileFAN and MobileFAN + KD, then (`demo.kdloss`) the
    KD-Loss teachers and student on the same data; evaluate all, print one table and write
    `demo_table.txt` and `demo_nme.png` (each run's CED and landmark grid are in
    <workdir>/<run>/eval/). Re-running resumes finished stages; SIGTERM stops after saving
    and returns None."""
    from fan_jax import data, evaluate, synthetic

    t0 = time.perf_counter()
    d = config.demo
    os.makedirs(workdir, exist_ok=True)
    # Each stage compiles its own steps; identical programs (the students' init and
    # evaluation) then come from this cache instead of compiling again.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    manual = config.dataset.manual_dir or os.path.join(workdir, "synthetic_300w")
    data_dir = config.dataset.data_dir or os.path.join(workdir, "tensorflow_datasets")
    if not os.path.exists(os.path.join(manual, "synthetic_300w.json")):
        _demo_log(t0, f"drawing {d.num_train} training and {d.num_test} test faces "
                      f"({d.image_size}px) into {manual}")
        synthetic.write_300w_tree(manual, d.num_train, d.num_test, seed=config.seed,
                                  size=d.image_size, overwrite=True)
    _demo_log(t0, "building them with the 300W TFDS builder")
    data.prepare("300w", data_dir=data_dir, manual_dir=manual)
    config = ml_collections.ConfigDict(config.to_dict())
    config.dataset.data_dir, config.dataset.manual_dir = data_dir, manual
    rows = {}
    for label, (name, c) in demo_configs(config, workdir).items():
        _demo_log(t0, f"training {label} ({c.model.name}, {c.train.num_train_steps} steps, batch "
                      f"{c.train.batch_size}, {c.input_size}x{c.input_size} crops) -> "
                      f"{workdir}/{name}")
        result = train_and_evaluate(c, os.path.join(workdir, name))
        if result.preempted:
            _demo_log(t0, f"stopped by SIGTERM during {label}; run the same command to resume")
            return None
        rows[label] = result.eval_results
    kd_config = demo_kdloss_config(config)
    if kd_config is not None:
        from fan_jax import kd_train

        _demo_log(t0, f"KD-Loss: Tough and Tolerant teachers ({kd_config.kd.teacher_model}), "
                      f"then the {kd_config.model.name} student, {kd_config.train.num_train_steps}"
                      f" steps each, {kd_config.input_size}x{kd_config.input_size} crops -> "
                      f"{workdir}/kdloss")
        kd_rows = kd_train.demo_rows(kd_config, os.path.join(workdir, "kdloss"))
        if kd_rows is None:
            _demo_log(t0, "stopped by SIGTERM during KD-Loss; run the same command to resume")
            return None
        labels = {"kdloss_teacher_tough": "KD-Loss Tough teacher",
                  "kdloss_teacher_tolerant": "KD-Loss Tolerant teacher",
                  "kdloss_student": "KD-Loss student (MobileNetV2 regression)"}
        rows.update({labels.get(k, k): v for k, v in kd_rows.items()})
    table = evaluate.format_table(rows)
    splits = list(next(iter(rows.values())))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "demo_table.txt"), "w") as f:
            f.write(table + "\n")
        _plot_demo(rows, os.path.join(workdir, "demo_nme.png"), splits)
        _demo_log(t0, f"done. Synthetic 300W test faces ({d.num_test}), NME normalised by the "
                      f"outer eye corners. Teacher: {d.teacher_model}, {d.teacher_steps} steps; "
                      f"students: {config.model.name}, {d.student_steps} steps each; batch "
                      f"{config.train.batch_size}, {config.input_size}x{config.input_size} crops.")
        print(table, flush=True)
        print(f"\nPlots: {workdir}/demo_nme.png and {workdir}/<run>/eval/ced_300w.png, "
              f"faces_*.png", flush=True)
    return rows
