"""The KD-Loss task: the Tough and Tolerant regression teachers and the regression student.

`config.kd.role` picks one of three roles:

  teacher_tough     MSE to the ground-truth landmarks;
  teacher_tolerant  MSE to ASM soft landmarks: a PCA shape model (`fan_jax.asm`) is fitted on
                    augmented training shapes, saved as `<workdir>/asm.npz` with the teacher,
                    and each batch's landmarks are projected onto it on device;
  student           KD-Loss (`fan_jax.kd_loss`) with both frozen teachers (inference mode,
                    behind stop_gradient).

Landmarks are normalised to the crop, u = (p + 0.5) / S (`fan_jax.landmarks`); the loop, the
checkpoints and the evaluation are the heatmap task's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from fan_jax import asm, checkpoints, geometry, input_pipeline, kd_loss, optim, steps
from fan_jax.errors import CheckpointMismatchError, TeacherError
from fan_jax.landmarks import prepare_images, to_normalized
from fan_jax.models import regression
from fan_jax.record import read_record
from fan_jax.tasks.base import Task, label

PyTree = Any
Source = Sequence[Mapping[str, Any]]
Metrics = dict[str, jax.Array]
TrainState = steps.TrainState

ROLES = ("teacher_tough", "teacher_tolerant", "student")
# The student network trained alone, on the MSE to the ground truth (the Tough teacher's loss):
# the baseline KD-Loss must beat. Not one of ROLES, which are the method's three runs.
ALONE = "student_alone"
ASM_FILE = "asm.npz"


def role(config: ml_collections.ConfigDict) -> str:
    r = config.kd.role
    if r not in (*ROLES, ALONE):
        raise ValueError(f"kd.role must be one of {(*ROLES, ALONE)}, got {r!r}")
    return r


def build_model(
    config: ml_collections.ConfigDict, num_landmarks: int
) -> regression.LandmarkRegressor:
    return regression.build_regressor(
        config.model.name, num_landmarks, **regression.config_kwargs(config.model)
    )


def init_variables(
    config: ml_collections.ConfigDict, model: regression.LandmarkRegressor, rng: jax.Array
) -> tuple[PyTree, PyTree]:
    """({'student': params}, {'student': batch_stats}); Keras ImageNet init if configured."""
    s = config.input_size
    variables = dict(
        jax.jit(functools.partial(model.init, train=False))(
            rng, jnp.zeros((1, s, s, 3), jnp.float32)
        )
    )
    if config.model.get("pretrained", ""):
        logging.info("Initialising the encoder from %s", config.model.pretrained)
        variables = regression.init_encoder_from_keras(model, variables, config.model.pretrained)
    if config.model.get("init_from", ""):
        variables = encoder_from_run(
            variables, config.model.init_from, config.model.get("init_from_checkpoint", "latest")
        )
    return {"student": variables["params"]}, {"student": variables.get("batch_stats", {})}


def encoder_from_run(variables: PyTree, workdir: str, which: str = "latest") -> dict:
    """`variables` with its encoder taken from another run's checkpoint (a heatmap or a
    regression workdir of the same trunk; layers that run lacks, such as MobileNetV2's final
    1x1 conv behind MobileFAN's encoder, keep their init). A regressor whose encoder is a
    whole heatmap FAN (`resnet18_fan_softargmax`) takes that run's whole network."""
    from flax import traverse_util

    try:
        src = checkpoints.load_model(workdir, which).variables
    except (FileNotFoundError, CheckpointMismatchError) as e:
        raise TeacherError(f"model.init_from={workdir}: {e}") from None
    out = dict(variables)
    copied = kept = 0
    whole = "decoder" in dict(dict(variables.get("params", {})).get("encoder", {}))
    for collection in ("params", "batch_stats"):
        if collection not in variables:
            continue
        old = traverse_util.flatten_dict(dict(variables[collection])["encoder"])
        tree_src = dict(src.get(collection, {}))
        new = traverse_util.flatten_dict(tree_src if whole else tree_src.get("encoder", {}))
        bad = [
            "/".join(k)
            for k, v in new.items()
            if k not in old or tuple(old[k].shape) != tuple(v.shape)
        ]
        if bad or not new:
            raise TeacherError(
                f"model.init_from={workdir}: its encoder does not fit this model's "
                f"({collection}: {bad[:3] or 'no encoder'}): use a run of the same trunk"
            )
        copied += len(new)
        kept += len(old) - len(new)
        merged = {k: jnp.asarray(new.get(k, v), v.dtype) for k, v in old.items()}
        tree = dict(variables[collection])
        tree["encoder"] = traverse_util.unflatten_dict(merged)
        out[collection] = tree
    logging.info(
        "Encoder from %s (%s checkpoint): %d arrays copied, %d kept at init",
        workdir,
        which,
        copied,
        kept,
    )
    return out


# --------------------------------------------------------------------------- ASM


def collect_augmented_shapes(
    source: Source,
    num_landmarks: int,
    augment: Mapping[str, Any],
    output_size: int,
    *,
    seed: int,
    augmentations: int = 4,
) -> np.ndarray:
    """[N * augmentations, L, 2] training shapes as the network sees them, normalised.

    Crops are drawn from the train pipeline's augmentation distribution (rotation, scale,
    flip with the landmark permutation) without warping images, like the public code's PCA
    over its augmented training set. Deterministic in `seed`.
    """
    cfg = input_pipeline.AugmentConfig.from_mapping(dict(augment, output_size=output_size))
    sampler = input_pipeline.TrainTransform(num_landmarks, cfg)
    perm = geometry.flip_permutation(num_landmarks) if cfg.p_flip > 0 else None
    rng = np.random.default_rng([int(seed), 0xA5])
    out = np.empty((len(source) * augmentations, num_landmarks, 2), np.float64)
    k = 0
    for i in range(len(source)):
        ex = source[i]
        lm = np.asarray(ex["landmarks"], np.float64)
        box = (
            geometry.box_from_landmarks(lm)
            if cfg.box_source == "landmarks"
            else np.asarray(ex["box"], np.float64)
        )
        for _ in range(augmentations):
            rotation, scale, flip = sampler.sample_params(rng)
            m = geometry.crop_transform(
                box, output_size, cfg.box_scale, rotation_deg=rotation, scale=scale, flip=flip
            )
            pts = geometry.apply_affine(m, lm)
            if flip:
                pts = pts[perm]
            out[k] = to_normalized(pts, output_size)
            k += 1
    return out


def fit_or_load_asm(
    config: ml_collections.ConfigDict, workdir: str, source: Source, num_landmarks: int
) -> asm.ShapeModel:
    """The Tolerant teacher's shape model: `<workdir>/asm.npz`, fitted on first use."""
    path = epath.Path(workdir) / ASM_FILE
    k = config.kd
    if path.exists():
        model = asm.ShapeModel.load(path)
        if model.num_landmarks != num_landmarks:
            raise ValueError(
                f"{path} models {model.num_landmarks} landmarks, the data has "
                f"{num_landmarks}; use a fresh workdir"
            )
        logging.info(
            "ASM from %s: %d modes (%.1f%% variance)", path, model.num_modes, model.variance_percent
        )
        return model
    t0 = time.perf_counter()
    shapes = collect_augmented_shapes(
        source,
        num_landmarks,
        config.augment.to_dict(),
        config.input_size,
        seed=config.seed,
        augmentations=k.asm_augmentations,
    )
    model = asm.fit(shapes, k.asm_variance_percent, k.asm_clip_sigmas)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
    logging.info(
        "ASM fitted on %d augmented shapes in %.1fs: %d modes keep %.1f%% variance; saved %s",
        len(shapes),
        time.perf_counter() - t0,
        model.num_modes,
        model.variance_percent,
        path,
    )
    return model


# --------------------------------------------------------------------------- steps (pure)


def _forward(
    model: regression.LandmarkRegressor,
    params: PyTree,
    batch_stats: PyTree,
    images: jax.Array,
    rng: jax.Array,
) -> tuple[jax.Array, PyTree]:
    pred, new_vars = cast(
        tuple[jax.Array, PyTree],
        model.apply(
            {"params": steps.cast_floating(params, images.dtype), "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": rng},
        ),
    )
    return pred.astype(jnp.float32), new_vars["batch_stats"]


def _frozen_forward(
    model: regression.LandmarkRegressor, variables: PyTree, images: jax.Array
) -> jax.Array:
    pred = cast(
        jax.Array, model.apply(steps.params_in(variables, images.dtype), images, train=False)
    )
    return jax.lax.stop_gradient(pred.astype(jnp.float32))


def teacher_step(
    state: TrainState,
    frozen: PyTree,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    model: regression.LandmarkRegressor,
    tx: optax.GradientTransformation,
    shape_model: asm.ShapeModel | None = None,
    compute_dtype: str = "float32",
) -> tuple[TrainState, Metrics]:
    """One Adam step on the MSE to the landmarks (to their ASM projection with `shape_model`).
    `frozen` is unused (a teacher has no teacher)."""
    images = prepare_images(batch["image"]).astype(steps.dtype_of(compute_dtype))
    target = to_normalized(batch["landmarks"], images.shape[1])
    if shape_model is not None:
        target = shape_model.project_jnp(target)
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        pred, new_bs = _forward(model, params["student"], state.batch_stats["student"], images, rng)
        loss = kd_loss.mse(pred, target)
        return loss, ({"student": new_bs}, {"loss": loss, "mse": loss})

    grads, (new_bs, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    return steps.apply_gradients(state, grads, new_bs, tx), metrics


_DEFAULT_LOSS = kd_loss.KDLossConfig()  # frozen dataclass: one shared default is safe


def student_step(
    state: TrainState,
    frozen: tuple[PyTree, PyTree],
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    model: regression.LandmarkRegressor,
    tough: regression.LandmarkRegressor,
    tolerant: regression.LandmarkRegressor,
    tx: optax.GradientTransformation,
    loss_config: kd_loss.KDLossConfig = _DEFAULT_LOSS,
    compute_dtype: str = "float32",
    coordinate_scale: float = 1.0,
) -> tuple[TrainState, Metrics]:
    """One Adam step on the KD-Loss; `frozen` = (tough, tolerant) variables.

    `coordinate_scale` multiplies every coordinate before the loss (1: crop widths, as the
    public code; the crop side: crop pixels), which moves where the main loss turns from
    linear to quadratic relative to the errors (`kd.loss_coordinate_scale`)."""
    images = prepare_images(batch["image"]).astype(steps.dtype_of(compute_dtype))
    gt = to_normalized(batch["landmarks"], images.shape[1])
    rng = jax.random.fold_in(rng, state.step)
    tough_vars, tolerant_vars = frozen
    t_tough = _frozen_forward(tough, tough_vars, images)
    t_tol = _frozen_forward(tolerant, tolerant_vars, images)

    def loss_fn(params):
        pred, new_bs = _forward(model, params["student"], state.batch_stats["student"], images, rng)
        k = coordinate_scale
        total, terms = kd_loss.kd_loss(k * pred, k * gt, k * t_tough, k * t_tol, loss_config)
        metrics = {
            "loss": total,
            **terms,
            "l1": jnp.mean(jnp.abs(pred - gt)),
            "l1_tough": jnp.mean(jnp.abs(t_tough - gt)),
            "l1_tolerant": jnp.mean(jnp.abs(t_tol - gt)),
        }
        return total, ({"student": new_bs}, metrics)

    grads, (new_bs, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    return steps.apply_gradients(state, grads, new_bs, tx), metrics


# --------------------------------------------------------------------------- teachers


def _teacher_command(config: ml_collections.ConfigDict, r: str) -> tuple[str, str]:
    kind = r.split("_", 1)[1]
    workdir = config.kd.get(f"{kind}_workdir", "")
    teacher_config = config.kd.get(f"{kind}_config", "") or f"configs/<dataset>_kdloss_{r}.py"
    return workdir, (
        f"python -m fan_jax.main --config={teacher_config} "
        f"--workdir={workdir or '<teacher workdir>'}"
    )


def teacher_record(config: ml_collections.ConfigDict, r: str) -> dict:
    """The record of the `r` teacher ('teacher_tough' | 'teacher_tolerant'), checked for fit
    (cheap: no JAX)."""
    kind = r.split("_", 1)[1]
    workdir, train_cmd = _teacher_command(config, r)
    if not workdir:
        raise TeacherError(
            f"kd.{kind}_workdir is empty: train the {kind} teacher and point to it:\n  {train_cmd}"
        )
    record = read_record(workdir)
    if record is None or not checkpoints.has_checkpoints(workdir):
        where = workdir if "://" in workdir else str(epath.Path(workdir).resolve())
        raise TeacherError(
            f"No {kind} teacher checkpoint in {where}. Train it first:\n  {train_cmd}"
        )
    if record.get("dataset", {}).get("name") != config.dataset.name:
        raise TeacherError(
            f"the {kind} teacher in {workdir} was trained on "
            f"{record.get('dataset', {}).get('name')!r}, this run trains on "
            f"{config.dataset.name!r}. Train a {config.dataset.name} teacher:\n  {train_cmd}"
        )
    got_role = record.get("kd", {}).get("role")
    if got_role != r:
        raise TeacherError(
            f"{workdir} holds a {got_role!r} run, not the {r!r} the "
            f"student needs. Train it:\n  {train_cmd}"
        )
    if int(record.get("input_size", config.input_size)) != config.input_size:
        raise TeacherError(
            f"the {kind} teacher in {workdir} was trained on "
            f"{record['input_size']}px crops, this run uses "
            f"{config.input_size}px"
        )
    return record


def preflight(config: ml_collections.ConfigDict) -> None:
    if role(config) == "student":
        for r in ROLES[:2]:
            teacher_record(config, r)


def load_teacher(
    config: ml_collections.ConfigDict, r: str, num_landmarks: int, sharding: Any = None
) -> tuple[regression.LandmarkRegressor, dict]:
    """A frozen teacher, `r` = 'teacher_tough' | 'teacher_tolerant': (model, variables)."""
    kind = r.split("_", 1)[1]
    teacher_record(config, r)
    workdir = config.kd.get(f"{kind}_workdir", "")
    try:
        loaded = checkpoints.load_model(
            workdir, config.kd.get("teacher_checkpoint", "best"), sharding=sharding
        )
    except CheckpointMismatchError as e:
        raise TeacherError(f"the {kind} teacher in {workdir}: {e}") from None
    if loaded.num_landmarks != num_landmarks:
        raise TeacherError(
            f"the {kind} teacher in {workdir} predicts {loaded.num_landmarks} "
            f"landmarks, this run's data has {num_landmarks}"
        )
    logging.info("%s teacher %r from %s, step %d", kind, loaded.model_name, workdir, loaded.step)
    return loaded.model, loaded.variables


# --------------------------------------------------------------------------- the task


def build(
    config: ml_collections.ConfigDict,
    workdir: str,
    train_source: Source,
    num_landmarks: int,
    steps_per_epoch: int,
    sharding: Any = None,
) -> Task:
    r = role(config)
    tx, schedule = optim.make_optimizer(config, steps_per_epoch)
    model = build_model(config, num_landmarks)
    init = functools.partial(init_variables, config, model)
    name = label(config)
    dtype = config.train.get("compute_dtype", "float32")
    if r == "student":
        tough, tough_vars = load_teacher(config, "teacher_tough", num_landmarks, sharding)
        tolerant, tol_vars = load_teacher(config, "teacher_tolerant", num_landmarks, sharding)
        loss_cfg = kd_loss.KDLossConfig.from_mapping(config.kd.loss.to_dict())
        step = functools.partial(
            student_step,
            model=model,
            tough=tough,
            tolerant=tolerant,
            tx=tx,
            loss_config=loss_cfg,
            compute_dtype=dtype,
            coordinate_scale=float(config.kd.get("loss_coordinate_scale", 1.0)),
        )
        return Task("regression", model, name, tx, schedule, init, step, (tough_vars, tol_vars))
    shape_model = None  # teacher_tough and student_alone: MSE to the ground truth
    if r == "teacher_tolerant":
        shape_model = fit_or_load_asm(config, workdir, train_source, num_landmarks)
    step = functools.partial(
        teacher_step, model=model, tx=tx, shape_model=shape_model, compute_dtype=dtype
    )
    return Task("regression", model, name, tx, schedule, init, step)
