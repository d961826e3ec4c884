"""KD-Loss training: the Tough and Tolerant EfficientNet teachers and the regression student.

`train_and_evaluate(config, workdir)` runs one of three roles (`config.kd.role`):

  teacher_tough     MSE to the ground-truth landmarks;
  teacher_tolerant  MSE to ASM soft landmarks: a PCA shape model (`fan_jax.asm`) is fitted on
                    augmented training shapes, saved as `<workdir>/asm.npz` with the teacher,
                    and each batch's landmarks are projected onto it on device;
  student           KD-Loss (`fan_jax.kd_loss`) with both frozen teachers (their best
                    checkpoints, inference mode, behind stop_gradient).

Everything else is the heatmap pipeline's: `fan_jax.input_pipeline` batches (landmarks in
crop pixels, normalised here to u = (p + 0.5) / S, so the crop's pixel edges are 0 and 1),
the mesh and sharding, checkpoint layout and manager of `fan_jax.train` ('model' holds
{'params': {'student': ...}, 'batch_stats': {'student': ...}}, plus 'opt' and the grain
'data' state, the latest few plus the best by validation NME), and the scoring of
`fan_jax.evaluate` (NME, FR, AUC, CED plots, landmark grids and metrics.json in
`<workdir>/eval`). Regression predictions replace heatmap decoding; flip-test averages
the prediction with the un-mirrored prediction of the mirrored crop.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fan_jax import (asm, checkpoints, evaluate, geometry, input_pipeline, kd_loss, steps, train,
                     validate)
from fan_jax.models import regression

PyTree = Any
Source = Sequence[Mapping[str, Any]]
Metrics = dict[str, jax.Array]

ROLES = ("teacher_tough", "teacher_tolerant", "student")
ASM_FILE = "asm.npz"
TrainState = steps.TrainState


# --------------------------------------------------------------------------- coordinates


def to_normalized(points: Any, size: int) -> Any:
    """Crop pixel coordinates -> [0, 1] of the crop (pixel edges at 0 and 1)."""
    return (points + 0.5) / size


def from_normalized(u: Any, size: int) -> Any:
    return u * size - 0.5


def unflip_normalized(u: Any, perm: np.ndarray) -> Any:
    """Prediction on a mirrored crop -> the original crop: x -> 1 - x, then the permutation."""
    flipped = jnp.stack([1.0 - u[..., 0], u[..., 1]], axis=-1) if isinstance(u, jax.Array) \
        else np.stack([1.0 - u[..., 0], u[..., 1]], axis=-1)
    return flipped[..., np.asarray(perm), :]


# --------------------------------------------------------------------------- config helpers


def is_regression(config: ml_collections.ConfigDict) -> bool:
    """Whether `config` is a KD-Loss / regression config (the dispatch test for main.py)."""
    model = config.get("model", None)
    return model is not None and model.get("kind", "heatmap") == "regression"


def _role(config: ml_collections.ConfigDict) -> str:
    role = config.kd.role
    if role not in ROLES:
        raise ValueError(f"kd.role must be one of {ROLES}, got {role!r}")
    return role


def model_kwargs(model_config: Mapping[str, Any]) -> dict:
    """Constructor overrides from the config's model section (negative = model default)."""
    kw = {}
    rate = model_config.get("dropout_rate", -1.0)
    if rate is not None and rate >= 0:
        kw["dropout_rate"] = float(rate)
    return kw


def build_model(config: ml_collections.ConfigDict,
                num_landmarks: int) -> regression.LandmarkRegressor:
    return regression.build_regressor(config.model.name, num_landmarks,
                                      **model_kwargs(config.model))


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam; 'inverse_time' lr / (1 + decay * step) (Keras's legacy `decay`, the public code)
    or the heatmap recipe's step decay ('piecewise')."""
    t = config.train
    kind = t.get("lr_schedule", "piecewise")
    if kind == "inverse_time":
        lr, decay = float(t.learning_rate), float(t.lr_inverse_time_decay)
        schedule = lambda step: lr / (1.0 + decay * step)  # noqa: E731
        return optax.adam(schedule, b1=t.adam_b1, b2=t.adam_b2), schedule
    if kind == "piecewise":
        return train.make_optimizer(config, steps_per_epoch)
    raise ValueError(f"train.lr_schedule must be 'inverse_time' or 'piecewise', got {kind!r}")


def init_variables(config: ml_collections.ConfigDict, model: regression.LandmarkRegressor,
                   rng: jax.Array) -> tuple[PyTree, PyTree]:
    """({'student': params}, {'student': batch_stats}); Keras ImageNet init if configured."""
    s = config.input_size
    variables = jax.jit(functools.partial(model.init, train=False))(
        rng, jnp.zeros((1, s, s, 3), jnp.float32))
    variables = dict(variables)
    if config.model.get("pretrained", ""):
        logging.info("Initialising the encoder from %s", config.model.pretrained)
        variables = regression.init_encoder_from_keras(model, variables, config.model.pretrained)
    return {"student": variables["params"]}, {"student": variables.get("batch_stats", {})}


# --------------------------------------------------------------------------- ASM


def collect_augmented_shapes(source: Source, num_landmarks: int, augment: Mapping[str, Any],
                             output_size: int, *, seed: int, augmentations: int = 4
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
        box = (geometry.box_from_landmarks(lm) if cfg.box_source == "landmarks"
               else np.asarray(ex["box"], np.float64))
        for _ in range(augmentations):
            rotation, scale, flip = sampler.sample_params(rng)
            m = geometry.crop_transform(box, output_size, cfg.box_scale, rotation_deg=rotation,
                                        scale=scale, flip=flip)
            pts = geometry.apply_affine(m, lm)
            if flip:
                pts = pts[perm]
            out[k] = to_normalized(pts, output_size)
            k += 1
    return out


def fit_or_load_asm(config: ml_collections.ConfigDict, workdir: str, source: Source,
                    num_landmarks: int) -> asm.ShapeModel:
    """The Tolerant teacher's shape model: `<workdir>/asm.npz`, fitted on first use."""
    path = os.path.join(workdir, ASM_FILE)
    k = config.kd
    if os.path.exists(path):
        model = asm.ShapeModel.load(path)
        if model.num_landmarks != num_landmarks:
            raise ValueError(f"{path} models {model.num_landmarks} landmarks, the data has "
                             f"{num_landmarks}; use a fresh workdir")
        logging.info("ASM from %s: %d modes (%.1f%% variance)", path, model.num_modes,
                     model.variance_percent)
        return model
    t0 = time.perf_counter()
    shapes = collect_augmented_shapes(source, num_landmarks, config.augment.to_dict(),
                                      config.input_size, seed=config.seed,
                                      augmentations=k.asm_augmentations)
    model = asm.fit(shapes, k.asm_variance_percent, k.asm_clip_sigmas)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        model.save(path)
    logging.info("ASM fitted on %d augmented shapes in %.1fs: %d modes keep %.1f%% variance; "
                 "saved %s", len(shapes), time.perf_counter() - t0, model.num_modes,
                 model.variance_percent, path)
    return model


# --------------------------------------------------------------------------- steps (pure)


def _forward(model: regression.LandmarkRegressor, params: PyTree, batch_stats: PyTree,
             images: jax.Array, rng: jax.Array) -> tuple[jax.Array, PyTree]:
    pred, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                 train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    return pred, new_vars["batch_stats"]


def _apply_gradients(state: TrainState, grads: PyTree, new_batch_stats: PyTree,
                     tx: optax.GradientTransformation) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=new_batch_stats, opt_state=opt_state)


def teacher_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                 model: regression.LandmarkRegressor, tx: optax.GradientTransformation,
                 shape_model: asm.ShapeModel | None = None) -> tuple[TrainState, Metrics]:
    """One Adam step on the MSE to the landmarks (to their ASM projection with `shape_model`)."""
    images = steps.prepare_images(batch["image"])
    target = to_normalized(batch["landmarks"], images.shape[1])
    if shape_model is not None:
        target = shape_model.project_jnp(target)
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        pred, new_bs = _forward(model, params["student"], state.batch_stats["student"], images, rng)
        loss = kd_loss.mse(pred, target)
        return loss, ({"student": new_bs}, {"loss": loss, "mse": loss})

    grads, (new_bs, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    return _apply_gradients(state, grads, new_bs, tx), metrics


def student_step(state: TrainState, teacher_variables: tuple[PyTree, PyTree],
                 batch: Mapping[str, jax.Array], rng: jax.Array, *,
                 model: regression.LandmarkRegressor, tough: regression.LandmarkRegressor,
                 tolerant: regression.LandmarkRegressor, tx: optax.GradientTransformation,
                 loss_config: kd_loss.KDLossConfig = kd_loss.KDLossConfig()
                 ) -> tuple[TrainState, Metrics]:
    """One Adam step on the KD-Loss; `teacher_variables` = (tough, tolerant) variables."""
    images = steps.prepare_images(batch["image"])
    gt = to_normalized(batch["landmarks"], images.shape[1])
    rng = jax.random.fold_in(rng, state.step)
    tough_vars, tolerant_vars = teacher_variables
    t_tough = jax.lax.stop_gradient(tough.apply(tough_vars, images, train=False))
    t_tol = jax.lax.stop_gradient(tolerant.apply(tolerant_vars, images, train=False))

    def loss_fn(params):
        pred, new_bs = _forward(model, params["student"], state.batch_stats["student"], images, rng)
        total, terms = kd_loss.kd_loss(pred, gt, t_tough, t_tol, loss_config)
        metrics = {"loss": total, **terms,
                   "l1": jnp.mean(jnp.abs(pred - gt)),
                   "l1_tough": jnp.mean(jnp.abs(t_tough - gt)),
                   "l1_tolerant": jnp.mean(jnp.abs(t_tol - gt))}
        return total, ({"student": new_bs}, metrics)

    grads, (new_bs, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    return _apply_gradients(state, grads, new_bs, tx), metrics


def predict_landmarks(variables: PyTree, images: jax.Array, *,
                      model: regression.LandmarkRegressor) -> jax.Array:
    """Inference-mode landmarks [B, L, 2] in crop pixel coordinates."""
    images = steps.prepare_images(images)
    return from_normalized(model.apply(variables, images, train=False), images.shape[1])


# --------------------------------------------------------------------------- teachers


def load_kd_teacher(config: ml_collections.ConfigDict, role: str, num_landmarks: int,
                    sharding: NamedSharding | None = None
                    ) -> tuple[regression.LandmarkRegressor, dict]:
    """A frozen teacher, role 'teacher_tough' | 'teacher_tolerant': (model, variables)."""
    kind = role.split("_", 1)[1]
    workdir = config.kd.get(f"{kind}_workdir", "")
    teacher_config = config.kd.get(f"{kind}_config", "") or f"configs/<dataset>_kdloss_{role}.py"
    train_cmd = (f"python -m fan_jax.main --config={teacher_config} "
                 f"--workdir={workdir or '<teacher workdir>'}")
    if not workdir:
        raise train.TeacherError(f"kd.{kind}_workdir is empty: train the {kind} teacher and "
                                 f"point to it:\n  {train_cmd}")
    run_config = _read_run_config(workdir)
    directory = os.path.join(workdir, train.CHECKPOINT_DIR)
    has_ckpt = os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))
    if run_config is None or not has_ckpt:
        raise train.TeacherError(f"No {kind} teacher checkpoint in {os.path.abspath(workdir)}. "
                                 f"Train it first:\n  {train_cmd}")
    if run_config.get("dataset", {}).get("name") != config.dataset.name:
        raise train.TeacherError(
            f"the {kind} teacher in {workdir} was trained on "
            f"{run_config.get('dataset', {}).get('name')!r}, this run trains on "
            f"{config.dataset.name!r}. Train a {config.dataset.name} teacher:\n  {train_cmd}")
    got_role = run_config.get("kd", {}).get("role")
    if got_role != role:
        raise train.TeacherError(f"{workdir} holds a {got_role!r} run, not the {role!r} the "
                                 f"student needs. Train it:\n  {train_cmd}")
    if int(run_config.get("input_size", config.input_size)) != config.input_size:
        raise train.TeacherError(f"the {kind} teacher in {workdir} was trained on "
                                 f"{run_config['input_size']}px crops, this run uses "
                                 f"{config.input_size}px")
    model_cfg = run_config["model"]
    teacher = regression.build_regressor(model_cfg["name"], num_landmarks,
                                         **model_kwargs(model_cfg))
    s = config.input_size
    shapes = jax.eval_shape(functools.partial(teacher.init, train=False), jax.random.key(0),
                            jnp.zeros((1, s, s, 3), jnp.float32))
    expected = {"params": {"student": shapes["params"]},
                "batch_stats": {"student": shapes.get("batch_stats", {})}}
    try:
        restored, step = train.restore_model_variables(
            workdir, config.kd.get("teacher_checkpoint", "best"), expected=expected,
            sharding=sharding)
    except train.CheckpointMismatchError as e:
        raise train.TeacherError(f"the {kind} teacher checkpoint in {workdir} does not match "
                                 f"{model_cfg['name']!r} with {num_landmarks} landmarks: {e}"
                                 ) from None
    logging.info("%s teacher %r from %s, step %d", kind, model_cfg["name"], workdir, step)
    return teacher, {"params": restored["params"]["student"],
                     "batch_stats": restored["batch_stats"]["student"]}


def _read_run_config(workdir: str) -> dict | None:
    path = os.path.join(workdir, train.CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- evaluation


class Predictor:
    """Host-local landmark predictor: uint8 crops -> crop-pixel landmarks (numpy)."""

    def __init__(self, model: regression.LandmarkRegressor):
        local = jax.local_devices()
        mesh = Mesh(np.asarray(local), ("batch",))
        self._repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
        self._n_dev = len(local)
        self._fn = jax.jit(functools.partial(predict_landmarks, model=model),
                           in_shardings=(self._repl, data), out_shardings=data)

    def __call__(self, variables: PyTree) -> Callable[[np.ndarray], np.ndarray]:
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


def predict_split(predict_fn: Callable[[np.ndarray], np.ndarray],
                  batches: Iterable[Mapping[str, np.ndarray]], flip_perm: np.ndarray | None
                  ) -> dict[str, np.ndarray]:
    """`fan_jax.evaluate.predict_split` for a landmark predictor (crop pixels out)."""
    plain, flipped, truth, crops, to_crop = [], [], [], [], []
    for batch in batches:
        images = np.asarray(batch["image"])
        valid = np.asarray(batch.get("valid", np.ones(len(images), bool)), bool)
        to_orig = np.asarray(batch["crop_to_original"], np.float64)
        size = images.shape[1]
        pts = np.asarray(predict_fn(images), np.float64)
        plain.append(geometry.apply_affine(to_orig, pts)[valid])
        if flip_perm is not None:
            mirror = to_normalized(np.asarray(predict_fn(images[:, :, ::-1]), np.float64), size)
            back = from_normalized(unflip_normalized(mirror, flip_perm), size)
            flipped.append(geometry.apply_affine(to_orig, 0.5 * (pts + back))[valid])
        truth.append(np.asarray(batch["original_landmarks"])[valid])
        crops.append(images[valid])
        to_crop.append(np.stack([geometry.invert_affine(m) for m in to_orig[valid]])
                       if valid.any() else np.zeros((0, 2, 3)))
    out = {"plain": np.concatenate(plain), "truth": np.concatenate(truth)}
    if flipped:
        out["flip"] = np.concatenate(flipped)
    out["crops"] = np.concatenate(crops)
    out["original_to_crop"] = np.concatenate(to_crop)
    return out


def evaluate_splits(predict_fn: Callable[[np.ndarray], np.ndarray],
                    split_batches: Mapping[str, Callable[[], Iterable[Mapping[str, np.ndarray]]]],
                    dataset: str, normalizer: str, flip_perm: np.ndarray | None,
                    out_dir: str | None = None, model_name: str = "model") -> dict:
    """`fan_jax.evaluate.evaluate_splits` for a landmark predictor: same results and files."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    curves: dict[str, np.ndarray] = {}
    grid = None
    for split, make_batches in split_batches.items():
        preds = predict_split(predict_fn, make_batches(), flip_perm)
        results[split] = {"no_flip": evaluate.score(preds["plain"], preds["truth"], dataset,
                                                    normalizer)}
        best = preds["plain"]
        if "flip" in preds:
            results[split]["flip"] = evaluate.score(preds["flip"], preds["truth"], dataset,
                                                    normalizer)
            best = preds["flip"]
        curves[split] = results[split]["flip" if "flip" in preds else "no_flip"]["per_image_nme"]
        if grid is None and len(preds["crops"]):
            grid = (preds, best, split)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(evaluate.strip_per_image(results), f, indent=2)
        evaluate.plot_ced(curves, os.path.join(out_dir, f"ced_{dataset}.png"),
                          f"{model_name} on {dataset}")
        if grid is not None:
            preds, best, split = grid
            to_crop = preds["original_to_crop"]
            evaluate.plot_landmark_grid(preds["crops"],
                                        geometry.apply_affine(to_crop, preds["truth"]),
                                        geometry.apply_affine(to_crop, best),
                                        os.path.join(out_dir, f"faces_{split}.png"))
    return evaluate.strip_per_image(results)


def _eval_batches_fn(config: ml_collections.ConfigDict, source: Source) -> Callable:
    a = config.augment
    return lambda: input_pipeline.eval_batches(
        source, config.eval.batch_size, output_size=config.input_size, box_source=a.box_source,
        box_scale=a.box_scale, shard_index=0, shard_count=1)


def validation_nme(config: ml_collections.ConfigDict, predictor: Predictor, variables: PyTree,
                   source: Source) -> float:
    """Mean NME (fraction, no flip-test) on the validation split."""
    split = config.dataset.val_split
    res = evaluate_splits(predictor(variables), {split: _eval_batches_fn(config, source)},
                          config.dataset.name, config.eval.normalizer, flip_perm=None)
    return float(res[split]["no_flip"]["nme"])


def _model_label(config: ml_collections.ConfigDict) -> str:
    return f"kdloss_{config.kd.role}"


def run_evaluation(config: ml_collections.ConfigDict, workdir: str, variables: PyTree,
                   sources: Mapping[str, Source] | None = None) -> dict:
    """Scores every test split; writes <workdir>/eval/metrics.json and plots; returns results."""
    if sources is None:
        _, _, test_splits = train.dataset_spec(config.dataset.name)
        sources = train.load_sources(config, tuple(config.eval.splits) or test_splits)
    splits = tuple(config.eval.splits) or tuple(k for k in sources if k != "train")
    num_landmarks = _num_landmarks(config, sources)
    predict = Predictor(build_model(config, num_landmarks))(variables)
    flip_perm = geometry.flip_permutation(num_landmarks) if config.eval.flip_test else None
    out_dir = os.path.join(workdir, "eval") if jax.process_index() == 0 else None
    results = evaluate_splits(predict, {s: _eval_batches_fn(config, sources[s]) for s in splits},
                              config.dataset.name, config.eval.normalizer, flip_perm,
                              out_dir=out_dir, model_name=_model_label(config))
    if jax.process_index() == 0:
        print(evaluate.format_table({_model_label(config): results}), flush=True)
    return results


def _num_landmarks(config: ml_collections.ConfigDict, sources: Mapping[str, Source] | None) -> int:
    if sources:
        first = next(iter(sources.values()))
        return int(np.asarray(first[0]["landmarks"]).shape[0])
    return train.dataset_spec(config.dataset.name)[1]


# --------------------------------------------------------------------------- loop


def _abstract(tree: PyTree, sharding: NamedSharding) -> PyTree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                        tree)


def _every(value: int, steps_per_epoch: int) -> int:
    if value < 0:
        return 0
    return value or steps_per_epoch


def _is_tfds(sources: Mapping[str, Source]) -> bool:
    return all(type(s).__module__.startswith("tensorflow_datasets") for s in sources.values())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       sources: Mapping[str, Source] | None = None,
                       evaluate_at_end: bool = True) -> train.TrainResult:
    """Trains the configured role (resuming from `workdir`), then evaluates the test splits."""
    role = _role(config)
    t = config.train
    mesh = train.make_mesh()
    validate.check(config, num_devices=mesh.devices.size)
    changes = checkpoints.check_rerun(config, workdir)
    if sources is None:
        if config.dataset.prepare:
            train.ensure_dataset(config)
        sources = train.load_sources(config, ("train", config.dataset.val_split))
    num_landmarks = _num_landmarks(config, sources)
    train_source = sources["train"]
    n_dev = mesh.devices.size
    repl = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("batch"))
    steps_per_epoch = max(1, len(train_source) // t.batch_size)
    num_steps = t.num_train_steps if t.num_train_steps > 0 else t.num_epochs * steps_per_epoch
    tx, schedule = make_optimizer(config, steps_per_epoch)
    model = build_model(config, num_landmarks)

    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    params, batch_stats = init_variables(config, model, init_rng)
    state = jax.jit(functools.partial(steps.create_train_state, tx=tx), out_shardings=repl)(
        params, batch_stats)

    if role == "student":
        tough, tough_vars = load_kd_teacher(config, "teacher_tough", num_landmarks, repl)
        tolerant, tol_vars = load_kd_teacher(config, "teacher_tolerant", num_landmarks, repl)
        loss_cfg = kd_loss.KDLossConfig.from_mapping(config.kd.loss.to_dict())
        jitted = jax.jit(functools.partial(student_step, model=model, tough=tough,
                                           tolerant=tolerant, tx=tx, loss_config=loss_cfg),
                         in_shardings=(repl, repl, data_sharding, repl),
                         out_shardings=(repl, repl), donate_argnums=(0,))
        teachers = (tough_vars, tol_vars)
        train_step = lambda s, b, r: jitted(s, teachers, b, r)  # noqa: E731
    else:
        shape_model = None
        if role == "teacher_tolerant":
            shape_model = fit_or_load_asm(config, workdir, train_source, num_landmarks)
        train_step = jax.jit(functools.partial(teacher_step, model=model, tx=tx,
                                               shape_model=shape_model),
                             in_shardings=(repl, data_sharding, repl),
                             out_shardings=(repl, repl), donate_argnums=(0,))

    train_iter = input_pipeline.train_iterator(
        train_source, num_landmarks, seed=config.seed, global_batch_size=t.batch_size,
        augment=dict(config.augment.to_dict(), output_size=config.input_size),
        num_workers=config.dataset.num_workers)
    mngr = train.checkpoint_manager(os.path.join(workdir, train.CHECKPOINT_DIR),
                                    keep=t.keep_checkpoints)
    state, train_iter = checkpoints.resume(mngr, state, train_iter, repl)
    checkpoints.commit_record(config, workdir, changes)  # the model is built and fits

    val_source = sources.get(config.dataset.val_split)
    eval_every = _every(t.eval_every_steps, steps_per_epoch) if val_source is not None else 0
    ckpt_every = _every(t.checkpoint_every_steps, steps_per_epoch)
    log_every = max(1, t.log_every_steps)
    predictor = Predictor(model) if eval_every else None
    writer = None
    if jax.process_index() == 0:
        from flax.metrics import tensorboard

        writer = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
    step = int(jax.device_get(state.step.addressable_data(0)))
    pending: list[tuple[int, dict]] = []
    last_val = None
    t_log, step_log = time.perf_counter(), step
    logging.info("KD-Loss %s: %s on %s, %d steps (%d per epoch), global batch %d on %d device(s)",
                 role, config.model.name, config.dataset.name, num_steps, steps_per_epoch,
                 t.batch_size, n_dev)

    def flush() -> None:
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
                raise train.NonFiniteLossError(
                    f"non-finite loss at step {s}: {bad}. Stopped; the last good checkpoint "
                    f"({'step ' + str(good) if good is not None else 'none'}) in "
                    f"{mngr.directory} is intact.")
        now = time.perf_counter()
        sps = (step - step_log) / max(now - t_log, 1e-9)
        means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        lr = float(schedule(step))
        if jax.process_index() == 0:
            terms = " ".join(f"{k} {v:.3g}" for k, v in means.items() if k != "loss")
            logging.info("step %d/%d | loss %.5g (%s) | lr %.2g | %.2f steps/s", step, num_steps,
                         means["loss"], terms, lr, sps)
        if writer is not None:
            for k, v in {**{f"train/{k}": v for k, v in means.items()},
                         "train/learning_rate": lr, "train/steps_per_sec": sps}.items():
                writer.scalar(k, v, step)
        t_log, step_log = now, step

    def save(metrics: dict | None) -> None:
        if step in mngr.all_steps():
            return
        mngr.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(train._model_item(state)),
            opt=ocp.args.StandardSave(train._opt_item(state)),
            data=grain.checkpoint.CheckpointSave(train_iter)), metrics=metrics, force=True)

    preempted = False
    # SIGTERM from here on saves a checkpoint at the next step boundary and returns.
    preemption = train._Preemption().__enter__()
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
            if step + 1 == t.get("nan_at_step", -1):
                local["landmarks"] = np.full_like(local["landmarks"], np.nan)
            global_batch = {k: jax.make_array_from_process_local_data(data_sharding, v)
                            for k, v in local.items()}
            state, metrics = train_step(state, global_batch, step_rng)
            step += 1
            pending.append((step, metrics))
            is_last = step == num_steps
            do_eval = is_last or (eval_every and step % eval_every == 0)
            do_ckpt = do_eval or (ckpt_every and step % ckpt_every == 0)
            if step % log_every == 0 or do_ckpt:
                flush()
            val_metrics = None
            if do_eval and val_source is not None:
                if predictor is None:
                    predictor = Predictor(model)
                last_val = validation_nme(config, predictor, train.student_variables(state),
                                          val_source)
                val_metrics = {"val_nme": last_val}
                if writer is not None:
                    writer.scalar(f"val/nme_{config.dataset.val_split}", last_val, step)
                logging.info("step %d | val NME (%s, %s) %.3f%%", step, config.dataset.val_split,
                             config.eval.normalizer, 100 * last_val)
            if do_ckpt:
                save(val_metrics)
        flush()
        save(None)
    finally:
        preemption.__exit__(None, None, None)
        mngr.wait_until_finished()
        mngr.close()
        if writer is not None:
            writer.flush()
            writer.close()
        close = getattr(train_iter, "close", None)
        if close is not None:
            close()

    results = None
    if evaluate_at_end and not preempted:
        variables = train.student_variables(state)
        if config.eval.checkpoint != "latest":
            restored, best = train.restore_model_variables(
                workdir, config.eval.checkpoint, expected=train._model_item(state), sharding=repl)
            logging.info("Evaluating the %s checkpoint (step %d)", config.eval.checkpoint, best)
            variables = {"params": restored["params"]["student"],
                         "batch_stats": restored["batch_stats"]["student"]}
        results = run_evaluation(config, workdir, variables,
                                 sources=None if _is_tfds(sources) else sources)
    return train.TrainResult(state=state, step=step, preempted=preempted, val_nme=last_val,
                             eval_results=results)


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *,
                     sources: Mapping[str, Source] | None = None,
                     overrides: Mapping[str, Any] | None = None) -> dict:
    """Eval mode: restores `config.eval.checkpoint` of `workdir` and scores the test splits
    (model and data settings from the workdir's record; see train.evaluate_workdir)."""
    config = checkpoints.config_from_record(config, workdir, overrides)
    validate.check(config)
    num_landmarks = _num_landmarks(config, sources)
    model = build_model(config, num_landmarks)
    s = config.input_size
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, s, s, 3), jnp.float32))
    expected = {"params": {"student": shapes["params"]},
                "batch_stats": {"student": shapes.get("batch_stats", {})}}
    restored, _ = train.restore_model_variables(workdir, config.eval.checkpoint,
                                                expected=expected)
    variables = {"params": restored["params"]["student"],
                 "batch_stats": restored["batch_stats"]["student"]}
    return run_evaluation(config, workdir, variables, sources=sources)


# --------------------------------------------------------------------------- demo


def synthetic_sources(num_train: int, num_test: int, seed: int = 0, size: int = 160
                      ) -> dict[str, list[dict]]:
    """In-memory 68-point synthetic faces ('train', 'test') in the TFDS feature layout."""
    from fan_jax import synthetic

    def make(n: int, stream: int) -> list[dict]:
        out = []
        for i in range(n):
            img, lm = synthetic.render_face(synthetic.image_rng(seed, i, stream), size)
            lm = lm.astype(np.float32)
            out.append({"image": img, "landmarks": lm,
                        "box": geometry.box_from_landmarks(lm).astype(np.float32),
                        "to_original": np.eye(2, 3, dtype=np.float32),
                        "original_landmarks": lm, "file_name": f"synthetic_{stream}_{i}"})
        return out

    return {"train": make(num_train, 101), "test": make(num_test, 102)}


def demo_rows(config: ml_collections.ConfigDict, workdir: str,
              sources: Mapping[str, Source] | None = None) -> dict[str, dict] | None:
    """Trains Tough, Tolerant and the student in `workdir/{tough,tolerant,student}`.

    `config` is one KD-Loss config (e.g. configs/demo_kdloss.py); the roles, workdirs and
    `kd.teacher_model` for the teachers are filled in here. `sources=None` reads the
    config's TFDS dataset. Returns {label: eval results} rows for
    `fan_jax.evaluate.format_table`, or None when SIGTERM stopped a run (it saved first).
    """
    rows = {}
    dirs = {r: os.path.join(workdir, r.replace("teacher_", "")) for r in ROLES}
    for role in ROLES:
        c = ml_collections.ConfigDict(config.to_dict())
        c.kd.role = role
        c.kd.tough_workdir, c.kd.tolerant_workdir = dirs["teacher_tough"], dirs["teacher_tolerant"]
        if role != "student":
            c.model.name = config.kd.get("teacher_model", "efficientnet_b3_reg")
            c.model.dropout_rate = -1.0
        res = train_and_evaluate(c, dirs[role], sources=sources)
        if res.preempted:
            return None
        rows[f"kdloss_{role}"] = res.eval_results
    return rows


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """KD-Loss on synthetic faces: both teachers and the student, then one table."""
    d = config.demo
    sources = synthetic_sources(d.num_train, d.num_test, seed=config.seed, size=d.image_size)
    rows = demo_rows(config, workdir, sources)
    if rows is None:
        logging.warning("stopped by SIGTERM; run the same command to resume")
        return {}
    if jax.process_index() == 0:
        table = evaluate.format_table(rows)
        print(table, flush=True)
        with open(os.path.join(workdir, "demo_table.txt"), "w") as f:
            f.write(table + "\n")
    return rows
