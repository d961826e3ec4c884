"""The training loop, for every task: `train_and_evaluate(config, workdir)`.

One loop serves every kind of run (`fan_jax.tasks`: heatmap, heatmap + distillation,
KD-Loss teachers and student). The task gives the network, its init, its pure step and its
landmark kind; this module gives the rest:

- One code path for 1 CPU, the 8 cores of a TPU host and many hosts: the step is jitted over
  a 1-D `Mesh` with a 'batch' axis; the state and the frozen teachers are replicated,
  batches are sharded `P('batch')`, and each host feeds only its own examples through
  `jax.make_array_from_process_local_data`. With jit over the global batch, BatchNorm sees
  the statistics of the whole global batch, so N devices compute the same step as one.
- Checkpoints (`fan_jax.checkpoints`): 'model' {'params', 'batch_stats'} of the network
  (and its KD adapters), 'opt' {'step', 'opt_state'} and 'data' (the grain iterator), so a
  resumed run sees exactly the batches the uninterrupted one would have. The latest
  `train.keep_checkpoints` are kept, plus the best by validation NME.
- Faults: SIGTERM (preemption) saves and returns; a NaN/Inf loss raises
  `NonFiniteLossError` naming the step, before anything past the last good checkpoint is
  saved. Losses are fetched from the device only at log/checkpoint boundaries, so the
  check costs no per-step host sync.
- Evaluation: `fan_jax.evaluate` over the task's landmarks function, at `eval_every_steps`
  on the validation split and at the end on every test split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fan_jax import (
    checkpoints,
    compiler,
    data,
    evaluate,
    input_pipeline,
    preemption,
    record,
    steps,
    tasks,
    train_logging,
    validate,
    workdir_lock,
)
from fan_jax.errors import CheckpointMismatchError, NonFiniteLossError

PyTree = Any
Source = Sequence[Mapping[str, Any]]


@dataclasses.dataclass
class TrainResult:
    state: steps.TrainState
    step: int
    preempted: bool
    val_nme: float | None
    eval_results: dict | None


def make_mesh() -> Mesh:
    """All devices of all hosts on one 'batch' axis."""
    return Mesh(np.asarray(jax.devices()), ("batch",))


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


def _model_item(state: steps.TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def _opt_item(state: steps.TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state}


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    sources: Mapping[str, Source] | None = None,
    evaluate_at_end: bool = True,
) -> TrainResult:
    """Trains the config's task (resuming from `workdir` when it has checkpoints), then
    evaluates the test splits.

    `sources` ({split: random-access source}) replaces the TFDS dataset (tests, demos).
    SIGTERM from here on saves a checkpoint at the next step boundary and returns.
    """
    train_logging.quiet_library_logs()
    mesh = make_mesh()
    # Before anything is read or written: bad values fail here with the workdir untouched;
    # then the lock (one run per workdir), a rerun that disagrees with the workdir's record,
    # and missing teachers.
    validate.check(config, num_devices=mesh.devices.size)
    with workdir_lock.hold(workdir, "training"), preemption.Preemption() as stop:
        return _train_locked(config, workdir, sources, evaluate_at_end, stop, mesh)


def _train_locked(
    config: ml_collections.ConfigDict,
    workdir: str,
    sources: Mapping[str, Source] | None,
    evaluate_at_end: bool,
    stop: preemption.Preemption,
    mesh: Mesh,
) -> TrainResult:
    t = config.train
    n_dev = mesh.devices.size
    changes = record.check_rerun(config, workdir)
    tasks.preflight(config)
    if sources is None:
        if config.dataset.prepare:
            data.ensure_built(config)
        sources = data.sources(config, ("train", config.dataset.val_split))
    num_landmarks = data.num_landmarks(config, sources)
    train_source = sources["train"]
    repl = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("batch"))

    epoch_steps = steps_per_epoch(config, len(train_source))
    num_steps = t.num_train_steps if t.num_train_steps > 0 else t.num_epochs * epoch_steps
    task = tasks.build(config, workdir, train_source, num_landmarks, epoch_steps, repl)

    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    params, batch_stats = task.init(init_rng)
    state = jax.jit(functools.partial(steps.create_train_state, tx=task.tx), out_shardings=repl)(
        params, batch_stats
    )
    train_iter = input_pipeline.train_iterator(
        train_source,
        num_landmarks,
        seed=config.seed,
        global_batch_size=t.batch_size,
        augment=augment_settings(config),
        num_workers=config.dataset.num_workers,
    )
    mngr = checkpoints.manager(checkpoints.checkpoint_dir(workdir), keep=t.keep_checkpoints)
    state, train_iter = checkpoints.resume(mngr, state, train_iter, repl)
    record.commit_record(config, workdir, changes)  # the model is built and fits

    jitted = jax.jit(
        task.step,
        in_shardings=(repl, repl, data_sharding, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
        compiler_options=compiler.compiler_options("train"),
    )
    frozen = task.frozen

    val_source = sources.get(config.dataset.val_split)
    eval_every = _every(t.eval_every_steps, epoch_steps) if val_source is not None else 0
    ckpt_every = _every(t.checkpoint_every_steps, epoch_steps)
    log_every = max(1, t.log_every_steps)
    writer = train_logging.Writer(workdir)
    evaluator = evaluate.Evaluator(task.kind, task.model) if eval_every else None
    step = int(jax.device_get(state.step.addressable_data(0)))
    start_step = step
    pending: list[tuple[int, dict]] = []  # device metrics not yet checked or logged
    last_val: float | None = None
    preempted = False
    t_start = t_log = time.perf_counter()
    step_log = step
    logging.info(
        "Training %s (%s) on %s: %d steps (%d per epoch), global batch %d on %d "
        "device(s), %d host(s)",
        task.label,
        config.model.name,
        config.dataset.name,
        num_steps,
        epoch_steps,
        t.batch_size,
        n_dev,
        jax.process_count(),
    )

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
                    f"{mngr.directory} is intact."
                )
        now = time.perf_counter()
        rate = {}
        if step > step_log:
            sps = (step - step_log) / max(now - t_log, 1e-9)
            rate = {"train/steps_per_sec": sps}
            speed = f"{sps:.2f} steps/s | ETA {train_logging.format_eta((num_steps - step) / sps)}"
        else:
            speed = "compiled"
        means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        lr = float(task.schedule(step))
        terms = " ".join(f"{k} {v:.3g}" for k, v in means.items() if k != "loss")
        if jax.process_index() == 0:
            logging.info(
                "step %d/%d | loss %.5g (%s) | lr %.2g | %s",
                step,
                num_steps,
                means["loss"],
                terms,
                lr,
                speed,
            )
        writer.scalars(
            step, {**{f"train/{k}": v for k, v in means.items()}, "train/learning_rate": lr, **rate}
        )
        t_log, step_log = now, step

    def save(metrics: dict | None) -> None:
        if step in mngr.all_steps():
            return
        with checkpoints.save_errors(mngr, step):
            mngr.save(
                step,
                args=ocp.args.Composite(
                    model=ocp.args.StandardSave(_model_item(state)),
                    opt=ocp.args.StandardSave(_opt_item(state)),
                    data=grain.checkpoint.CheckpointSave(train_iter),
                ),
                metrics=metrics,
                force=True,
            )

    try:
        while step < num_steps:
            if stop.stop_now(step, log_every):
                flush()
                save(None)
                preempted = True
                logging.warning("Preempted: saved step %d in %s", step, mngr.directory)
                break
            batch = next(train_iter)
            local = {"image": batch["image"], "landmarks": batch["landmarks"]}
            if step + 1 == t.nan_at_step:
                local["landmarks"] = np.full_like(local["landmarks"], np.nan)
            global_batch = {
                k: jax.make_array_from_process_local_data(data_sharding, v)
                for k, v in local.items()
            }
            state, metrics = jitted(state, frozen, global_batch, step_rng)
            step += 1
            if step == start_step + 1:
                # Keep compilation out of the steps/s and ETA figures.
                jax.block_until_ready(metrics)
                if jax.process_index() == 0:
                    logging.info(
                        "first step (with compilation) took %.1fs", time.perf_counter() - t_log
                    )
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
                assert evaluator is not None and val_source is not None  # eval_every > 0
                last_val = evaluate.validation_nme(
                    config, evaluator, checkpoints.student_variables(state), val_source
                )
                t_log += time.perf_counter() - t_eval  # keep validation out of steps/s
                val_metrics = {"val_nme": last_val}
                writer.scalars(step, {f"val/nme_{config.dataset.val_split}": last_val})
                if jax.process_index() == 0:
                    logging.info(
                        "step %d | val NME (%s, %s) %.3f%%",
                        step,
                        config.dataset.val_split,
                        config.eval.normalizer,
                        100 * last_val,
                    )
            if do_ckpt:
                save(val_metrics)
        else:
            flush()
            save(None)
    finally:
        try:
            with checkpoints.save_errors(mngr, step):
                mngr.wait_until_finished()
        finally:
            with contextlib.suppress(Exception):  # the save error above is the one to report
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
        variables = checkpoints.student_variables(state)
        if config.eval.checkpoint != "latest":
            restored, which = checkpoints.restore_model(
                workdir, config.eval.checkpoint, expected=_model_item(state), sharding=repl
            )
            logging.info("Evaluating the %s checkpoint (step %d)", config.eval.checkpoint, which)
            variables = checkpoints.student_variables(restored)
        results = _evaluate(
            config,
            workdir,
            task.kind,
            task.model,
            variables,
            task.label,
            None if data.is_tfds(sources) else sources,
        )
    return TrainResult(
        state=state, step=step, preempted=preempted, val_nme=last_val, eval_results=results
    )


def _evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    kind: str,
    model: Any,
    variables: PyTree,
    label: str,
    sources: Mapping[str, Source] | None,
) -> dict:
    """Every test split (of the TFDS dataset, or of the in-memory `sources`)."""
    if sources is None:
        sources = data.sources(config, data.test_splits(config))
    return evaluate.evaluate(config, workdir, kind, model, variables, sources, label)


def evaluate_workdir(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    sources: Mapping[str, Source] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """Eval mode: restores `config.eval.checkpoint` of `workdir` and scores the test splits.

    The model and data settings come from the workdir's record, not from `config`; an entry
    of `overrides` (the command line's) that contradicts the record is an error."""
    train_logging.quiet_library_logs()
    config = record.config_from_record(config, workdir, overrides)
    validate.check(config)
    if sources is None:
        # Eval reads the data the run trained on; building it would write outside the workdir.
        data.require_built(config)
    with workdir_lock.hold(workdir, "evaluation", create=False):
        loaded = checkpoints.load_model(
            workdir, config.eval.checkpoint, default_record=config.to_dict()
        )
        want = data.num_landmarks(config, sources)
        if loaded.num_landmarks != want:
            raise CheckpointMismatchError(
                f"{workdir}: the checkpoint predicts {loaded.num_landmarks} landmarks, "
                f"{config.dataset.name} has {want}"
            )
        logging.info("Evaluating %s, step %d", workdir, loaded.step)
        return _evaluate(
            config,
            workdir,
            loaded.kind,
            loaded.model,
            loaded.variables,
            tasks.label(config),
            sources,
        )
