"""KD-Loss training integration: coordinates, ASM shapes, configs, and the three-role loop.

The loop runs end to end on synthetic faces with a tiny registered regressor (the real
networks' steps are traced with eval_shape, which checks every shape without compiling).
"""

from __future__ import annotations

import functools
import glob
import importlib
import json
import os
import signal
import sys

import _train_helpers as helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fan_jax import (
    asm,
    errors,
    geometry,
    input_pipeline,
    landmarks,
    optim,
    steps,
    synthetic,
    tasks,
    train,
)
from fan_jax.models import regression
from fan_jax.tasks import kdloss as kdloss_task

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # for `from configs import ...`

DATASETS = ("wflw", "300w", "cofw")
ROLES = ("teacher_tough", "teacher_tolerant", "student")


def load_config(name: str):
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.fixture()
def tiny(monkeypatch):
    monkeypatch.setitem(regression.REGRESSORS, "tiny_reg", helpers.tiny_regressor)


@functools.cache
def sources():
    return synthetic.sources(10, 4, seed=0, size=96)


def tiny_config(role: str, root: str, steps_: int = 2):
    c = load_config(f"300w_kdloss_{role}")
    c.dataset.prepare = False
    c.dataset.val_split = "test"
    c.augment.box_source = "landmarks"
    c.model.name = "tiny_reg"
    c.input_size = 64
    c.train.batch_size = 4
    c.train.num_train_steps = steps_
    c.train.log_every_steps = 1
    c.train.checkpoint_every_steps = 1
    c.train.eval_every_steps = 1
    c.eval.batch_size = 4
    c.kd.asm_augmentations = 2
    c.kd.tough_workdir = os.path.join(root, "tough")
    c.kd.tolerant_workdir = os.path.join(root, "tolerant")
    return c


def test_normalized_coordinates_and_flip():
    pts = np.random.default_rng(0).uniform(-0.5, 63.5, (68, 2))
    np.testing.assert_allclose(landmarks.from_normalized(landmarks.to_normalized(pts, 64), 64), pts)
    np.testing.assert_allclose(landmarks.to_normalized(np.array([-0.5, 63.5]), 64), [0.0, 1.0])
    perm = geometry.flip_permutation(68)
    mirrored = geometry.flip_landmarks(pts, 64)  # what a perfect model predicts on the mirror
    back = landmarks.unflip_normalized(landmarks.to_normalized(mirrored, 64), perm)
    np.testing.assert_allclose(back, landmarks.to_normalized(pts, 64), atol=1e-12)
    back_j = landmarks.unflip_normalized(jnp.asarray(landmarks.to_normalized(mirrored, 64)), perm)
    np.testing.assert_allclose(np.asarray(back_j), landmarks.to_normalized(pts, 64), atol=1e-5)


def test_augmented_shapes_match_the_train_pipeline():
    src = sources()["train"][:3]
    aug = dict(
        box_source="landmarks",
        box_scale=1.25,
        p_rotate=0.6,
        max_rotation_deg=30.0,
        scale_range=(0.75, 1.25),
        p_flip=0.5,
    )
    shapes = kdloss_task.collect_augmented_shapes(src, 68, aug, 64, seed=5, augmentations=2)
    assert shapes.shape == (6, 68, 2)
    np.testing.assert_array_equal(
        shapes, kdloss_task.collect_augmented_shapes(src, 68, aug, 64, seed=5, augmentations=2)
    )
    # Same crops as TrainTransform with the same parameters (images warped there, not here).
    tt = input_pipeline.TrainTransform(68, input_pipeline.AugmentConfig(output_size=64, **aug))
    rng = np.random.default_rng([5, 0xA5])
    k = 0
    for ex in src:
        for _ in range(2):
            want = tt.apply(ex, *tt.sample_params(rng))["landmarks"]
            np.testing.assert_allclose(landmarks.from_normalized(shapes[k], 64), want, atol=1e-3)
            k += 1


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("role", ROLES)
def test_configs_build(dataset, role):
    c = load_config(f"{dataset}_kdloss_{role}")
    assert tasks.is_regression(c)
    assert c.kd.role == role and c.dataset.name == dataset
    assert c.model.name == ("mobilenet_v2_reg" if role == "student" else "efficientnet_b3_reg")
    assert c.input_size == 224 and c.train.batch_size == 70 and c.train.num_epochs == 150
    assert c.kd.tough_workdir.endswith(f"{dataset}_kdloss_teacher_tough")
    assert os.path.exists(c.kd.tolerant_config)
    optim.make_optimizer(c, 100)
    from fan_jax import kd_loss

    assert kd_loss.KDLossConfig.from_mapping(c.kd.loss.to_dict()) == kd_loss.KDLossConfig()


def test_heatmap_configs_are_not_regression():
    assert not tasks.is_regression(load_config("wflw_mobilefan"))
    assert tasks.is_regression(load_config("demo_kdloss"))


def test_inverse_time_schedule():
    c = load_config("wflw_kdloss_student")
    _, schedule = optim.make_optimizer(c, 100)
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(10000)) == pytest.approx(1e-3 / 2)


@pytest.mark.parametrize("role", ROLES)
def test_real_model_steps_trace(role):
    """Each role's step with the configured networks (traced, not compiled)."""
    c = load_config(f"wflw_kdloss_{role}")
    s, n_lm = 64, 98
    model = kdloss_task.build_model(c, n_lm)
    tx, _ = optim.make_optimizer(c, 10)
    x = jnp.zeros((1, s, s, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    state = jax.eval_shape(
        functools.partial(steps.create_train_state, tx=tx),
        {"student": shapes["params"]},
        {"student": shapes["batch_stats"]},
    )
    batch = {
        "image": jax.ShapeDtypeStruct((2, s, s, 3), jnp.uint8),
        "landmarks": jax.ShapeDtypeStruct((2, n_lm, 2), jnp.float32),
    }
    rng = jax.random.key(1)
    if role == "student":
        teacher = regression.build_regressor(c.kd.teacher_model, n_lm)
        tvars = jax.eval_shape(functools.partial(teacher.init, train=False), jax.random.key(0), x)
        fn = functools.partial(
            kdloss_task.student_step, model=model, tough=teacher, tolerant=teacher, tx=tx
        )
        new_state, metrics = jax.eval_shape(fn, state, (tvars, tvars), batch, rng)
        assert {"main", "tough", "tolerant", "loss"} <= set(metrics)
    else:
        shape_model = None
        if role == "teacher_tolerant":
            shape_model = asm.fit(np.random.default_rng(0).uniform(size=(20, n_lm, 2)), 97)
        fn = functools.partial(
            kdloss_task.teacher_step, model=model, tx=tx, shape_model=shape_model
        )
        new_state, metrics = jax.eval_shape(fn, state, (), batch, rng)
    assert metrics["loss"].shape == ()
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


@pytest.mark.slow
def test_three_roles_end_to_end(tiny, tmp_path):
    root = str(tmp_path)
    src = sources()
    results = {}
    for role in ROLES:
        c = tiny_config(role, root)
        workdir = os.path.join(root, role.replace("teacher_", ""))
        res = train.train_and_evaluate(c, workdir, sources=src)
        assert res.step == 2 and np.isfinite(res.val_nme)
        results[role] = res.eval_results
        with open(os.path.join(workdir, "eval", "metrics.json")) as f:
            saved = json.load(f)
        assert set(saved["test"]) == {"no_flip", "flip"}
        assert saved["test"]["flip"]["num_images"] == 4
        assert glob.glob(os.path.join(workdir, "eval", "ced_*.png"))
    model = asm.ShapeModel.load(os.path.join(root, "tolerant", kdloss_task.ASM_FILE))
    assert model.num_landmarks == 68 and 0 < model.num_modes <= 19
    assert not os.path.exists(os.path.join(root, "tough", kdloss_task.ASM_FILE))

    # Resume: the student's run continues from its last checkpoint.
    c = tiny_config("student", root, steps_=3)
    c.train.allow_changes = True  # extending the run changes its record
    res = train.train_and_evaluate(
        c, os.path.join(root, "student"), sources=src, evaluate_at_end=False
    )
    assert res.step == 3

    # Eval mode restores and scores the same numbers as the end of training (latest ckpt).
    c = tiny_config("teacher_tough", root)
    c.eval.checkpoint = "latest"
    again = train.evaluate_workdir(c, os.path.join(root, "tough"), sources=src)
    assert again["test"]["no_flip"]["nme"] == pytest.approx(
        results["teacher_tough"]["test"]["no_flip"]["nme"], rel=1e-5
    )

    # Teacher errors name what to run.
    c = tiny_config("student", root)
    c.kd.tough_workdir = str(tmp_path / "missing")
    with pytest.raises(errors.TeacherError, match="kdloss_teacher_tough"):
        train.train_and_evaluate(c, str(tmp_path / "s2"), sources=src)
    c = tiny_config("student", root)
    c.kd.tough_workdir = os.path.join(root, "tolerant")
    with pytest.raises(errors.TeacherError, match="teacher_tolerant"):
        train.train_and_evaluate(c, str(tmp_path / "s3"), sources=src)


def test_non_finite_loss_raises(tiny, tmp_path):
    c = tiny_config("teacher_tough", str(tmp_path), steps_=3)
    c.train.nan_at_step = 2
    with pytest.raises(errors.NonFiniteLossError, match="step 2"):
        train.train_and_evaluate(c, str(tmp_path / "nan"), sources=sources())


def test_sigterm_saves_and_stops(tiny, tmp_path):
    c = tiny_config("teacher_tough", str(tmp_path), steps_=1000)
    c.train.eval_every_steps = -1
    src = sources()
    killer = helpers.SigtermOnRead(src["train"], at=5)
    previous = signal.getsignal(signal.SIGTERM)
    res = train.train_and_evaluate(c, str(tmp_path / "run"), sources={**src, "train": killer})
    assert killer.sent and res.preempted and res.eval_results is None
    assert res.step < 20, "the signal should stop the run within a few steps"
    assert str(res.step) in os.listdir(tmp_path / "run" / "checkpoints")
    assert signal.getsignal(signal.SIGTERM) is previous


def test_kdloss_workdir_serves_predict_and_export_like_a_heatmap_one(tiny, tmp_path):
    """A KD-Loss (regression) workdir through the same readers as MobileFAN's: eval-mode
    numbers, `fan_jax.predict` and an ONNX export agree with the trained network."""
    from fan_jax import export, predict

    c = tiny_config("teacher_tough", str(tmp_path), steps_=2)
    c.train.eval_every_steps = -1  # never: not even at the last step
    workdir = str(tmp_path / "tough")
    res = train.train_and_evaluate(c, workdir, sources=sources())
    assert res.val_nme is None
    loaded = predict.load_student(workdir=workdir, which="latest")
    assert loaded.kind == "regression" and loaded.num_landmarks == 68

    batch = next(
        iter(
            input_pipeline.eval_batches(
                sources()["test"],
                3,
                output_size=64,
                box_source="landmarks",
                box_scale=1.25,
                shard_index=0,
                shard_count=1,
            )
        )
    )
    crops = np.asarray(batch["image"])
    p = predict.Predictor.from_loaded(loaded)
    pts, scores = p.predict_crops(crops)
    want = landmarks.from_normalized(
        np.asarray(
            loaded.model.apply(loaded.variables, landmarks.normalize_np(crops), train=False)
        ),
        64,
    )
    np.testing.assert_allclose(pts, want, atol=1e-4)
    assert pts.shape == (3, 68, 2) and np.all(scores == 1)

    out = str(tmp_path / "tough.onnx")
    export.export(loaded.model, loaded.variables, 64, "onnx", out, kind=loaded.kind)
    got = export.load_exported(out)(crops.astype(np.float32))
    assert set(got) == {"landmarks"}
    np.testing.assert_allclose(got["landmarks"], want, atol=1e-3)
    with open(out + export.SIDE_CAR_SUFFIX) as f:
        assert json.load(f)["outputs"].keys() == {"landmarks"}


def test_inference_imports_no_training_module():
    code = (
        "import sys, fan_jax.predict, fan_jax.export; "
        "bad = [m for m in ('fan_jax.train', 'fan_jax.tasks', 'fan_jax.input_pipeline', "
        "'optax', 'grain') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
