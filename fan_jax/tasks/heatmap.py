"""The heatmap task: MobileFAN or a teacher on heatmap MSE, optionally distilled (FA / FS)
from a frozen heatmap teacher (the paper's method; the steps are `fan_jax.steps`).

State layout: params {'student': ..., 'adapters': ...} ('adapters' only with an FA term) and
batch_stats mirroring it; the adapters train with the student and are dropped at export.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from fan_jax import checkpoints, optim, steps
from fan_jax.errors import CheckpointMismatchError, TeacherError
from fan_jax.models import fan
from fan_jax.record import read_record
from fan_jax.tasks.base import Task, label, run_once

PyTree = Any


def init_variables(
    config: ml_collections.ConfigDict, model: fan.FAN, adapters: fan.Adapters | None, rng: jax.Array
) -> tuple[PyTree, PyTree]:
    """(params, batch_stats) as {'student': ..., 'adapters': ...}, on the default device;
    the encoder from `model.pretrained` (a Keras ImageNet file) when set."""
    s = config.input_size
    images = jnp.zeros((1, s, s, 3), jnp.float32)
    k_model, k_adapt = jax.random.split(rng)
    variables = dict(run_once(functools.partial(model.init, train=False), k_model, images))
    if config.model.pretrained:
        from fan_jax import pretrained

        logging.info(
            "Initialising the %s encoder from %s",
            pretrained.describe(model.encoder),
            config.model.pretrained,
        )
        variables = pretrained.init_encoder_from_keras(model, variables, config.model.pretrained)
    params = {"student": variables["params"]}
    batch_stats = {"student": variables.get("batch_stats", {})}
    if adapters is not None:
        _, taps = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
        taps = tuple(jnp.zeros(t.shape, t.dtype) for t in taps)
        avars = run_once(functools.partial(adapters.init, train=False), k_adapt, taps)
        params["adapters"] = avars["params"]
        if "batch_stats" in avars:
            batch_stats["adapters"] = avars["batch_stats"]
    return params, batch_stats


def teacher_record(config: ml_collections.ConfigDict) -> dict:
    """The record of the teacher run named by `config.distill`, checked for fit.

    Cheap (no JAX), so a run fails on a missing teacher before building any dataset.
    Errors name the command that trains the teacher.
    """
    d = config.distill
    workdir = d.teacher_workdir
    train_cmd = (
        f"python -m fan_jax.main --config={d.teacher_config or 'configs/<dataset>_teacher.py'}"
        f" --workdir={workdir or '<teacher workdir>'}"
    )
    if not workdir:
        raise TeacherError(
            "distill.enabled is set but distill.teacher_workdir is empty. Train a "
            f"teacher and point to it:\n  {train_cmd}\n  then "
            "--config.distill.teacher_workdir=<that workdir>"
        )
    record = read_record(workdir)
    if record is None or not checkpoints.has_checkpoints(workdir):
        where = workdir if "://" in workdir else str(epath.Path(workdir).resolve())
        raise TeacherError(
            f"No teacher checkpoint in {where}. Train the teacher first:\n  {train_cmd}"
        )
    teacher_ds = record["dataset"]["name"]
    if teacher_ds != config.dataset.name:
        raise TeacherError(
            f"the teacher in {workdir} was trained on {teacher_ds!r}, this run "
            f"trains on {config.dataset.name!r}: its heatmaps and landmarks do not "
            f"match. Train a {config.dataset.name} teacher:\n  {train_cmd}"
        )
    if record.get("distill", {}).get("enabled"):
        raise TeacherError(
            f"{workdir} holds a distilled student, not a teacher "
            f"(its config has distill.enabled=True). Train the teacher:\n  {train_cmd}"
        )
    if record.get("model", {}).get("kind", "heatmap") != "heatmap":
        raise TeacherError(
            f"{workdir} holds a {record['model']['kind']} model; a heatmap "
            f"student needs a heatmap teacher:\n  {train_cmd}"
        )
    return record


def load_teacher(
    config: ml_collections.ConfigDict, num_landmarks: int, sharding: Any = None
) -> tuple[fan.FAN, dict]:
    """The frozen teacher named by `config.distill`: (model, {'params', 'batch_stats'}).

    The architecture comes from the teacher's record, so any model in the registry can teach.
    """
    d = config.distill
    teacher_record(config)
    try:
        loaded = checkpoints.load_model(d.teacher_workdir, d.teacher_checkpoint, sharding=sharding)
    except CheckpointMismatchError as e:
        raise TeacherError(f"the teacher in {d.teacher_workdir}: {e}") from None
    if loaded.num_landmarks != num_landmarks:
        raise TeacherError(
            f"the teacher in {d.teacher_workdir} predicts {loaded.num_landmarks} "
            f"landmarks, this run's data has {num_landmarks}"
        )
    logging.info("Teacher %r from %s, step %d", loaded.model_name, d.teacher_workdir, loaded.step)
    return loaded.model, loaded.variables


def _no_teacher(state: steps.TrainState, frozen: PyTree, batch: Any, rng: jax.Array, **kw: Any):
    return steps.train_step(state, batch, rng, **kw)


def build(
    config: ml_collections.ConfigDict,
    num_landmarks: int,
    steps_per_epoch: int,
    sharding: Any = None,
) -> Task:
    tx, schedule = optim.make_optimizer(config, steps_per_epoch)
    model = fan.build_model(config.model.name, num_landmarks)
    d = config.distill
    dtype = config.train.get("compute_dtype", "float32")
    if not d.enabled:
        step = functools.partial(
            _no_teacher, model=model, tx=tx, sigma=config.sigma, compute_dtype=dtype
        )
        init = functools.partial(init_variables, config, model, None)
        return Task("heatmap", model, label(config), tx, schedule, init, step)
    teacher, teacher_vars = load_teacher(config, num_landmarks, sharding)
    adapters = None
    if any(d.fa_layers):
        adapters = fan.Adapters(features=fan.teacher_channels(teacher), kind=d.adapter_kind)
    step = functools.partial(
        steps.distill_step,
        model=model,
        adapters=adapters,
        teacher=teacher,
        tx=tx,
        sigma=config.sigma,
        lam=d.lam,
        fa_layers=tuple(d.fa_layers),
        fs_layers=tuple(d.fs_layers),
        fs_form=d.fs_form,
        compute_dtype=dtype,
    )
    init = functools.partial(init_variables, config, model, adapters)
    return Task("heatmap", model, label(config), tx, schedule, init, step, teacher_vars)
