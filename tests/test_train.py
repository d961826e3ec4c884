"""Tests for fan_jax.train: exact resume, SIGTERM, NaN, teacher errors, best checkpoint,
TensorBoard terms, eval mode. Tiny models and in-memory data (tests/_train_helpers.py)."""

import glob
import json
import logging as py_logging
import os
import signal
import sys

import jax
import numpy as np
import pytest
from absl import logging as absl_logging

from fan_jax import checkpoints, demo, errors, train
from fan_jax.tasks import heatmap as heatmap_task

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers

helpers.register_tiny_models()

STEPS = 4


def _config(**overrides):
    base = {
        "model.name": "tiny_student",
        "train.num_train_steps": STEPS,
        "train.checkpoint_every_steps": 2,
    }
    base.update(overrides)
    return helpers.tiny_config("300w_mobilefan", **base)


def _params(state):
    return helpers.params_npz(state)


def _assert_same_params(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 4-step run: (workdir, final params)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = train.train_and_evaluate(
        _config(), workdir, sources=helpers.fake_sources(), evaluate_at_end=False
    )
    assert result.step == STEPS and not result.preempted
    return workdir, _params(result.state)


def _steps_in(workdir):
    return sorted(
        int(os.path.basename(p))
        for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
        if os.path.basename(p).isdigit()
    )


def test_resume_is_exact(reference_run, tmp_path):
    _, expected = reference_run
    workdir = str(tmp_path)
    first = train.train_and_evaluate(
        _config(**{"train.num_train_steps": 2}),
        workdir,
        sources=helpers.fake_sources(),
        evaluate_at_end=False,
    )
    assert first.step == 2
    assert os.path.exists(os.path.join(workdir, "checkpoints", "2", "data", "process_0-of-1.json"))
    # Extending a run is a deliberate change to its record.
    second = train.train_and_evaluate(
        _config(**{"train.allow_changes": True}),
        workdir,
        sources=helpers.fake_sources(),
        evaluate_at_end=False,
    )
    assert second.step == STEPS
    _assert_same_params(_params(second.state), expected)


def test_sigterm_saves_and_resumes_exactly(reference_run, tmp_path):
    _, expected = reference_run
    workdir = str(tmp_path)
    sources = helpers.fake_sources()
    killer = helpers.SigtermOnRead(sources["train"], at=5)
    previous = signal.getsignal(signal.SIGTERM)
    result = train.train_and_evaluate(
        _config(**{"train.num_train_steps": 1000}),
        workdir,
        sources={**sources, "train": killer},
        evaluate_at_end=False,
    )
    assert killer.sent and result.preempted
    assert result.step < STEPS, "the signal should stop the run within a few steps"
    assert result.step in _steps_in(workdir), "the preemption checkpoint is missing"
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
    resumed = train.train_and_evaluate(
        _config(**{"train.allow_changes": True}),
        workdir,
        sources=helpers.fake_sources(),
        evaluate_at_end=False,
    )
    assert resumed.step == STEPS
    _assert_same_params(_params(resumed.state), expected)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path)
    config = _config(
        **{"train.num_train_steps": 6, "train.nan_at_step": 3, "train.log_every_steps": 10}
    )
    with pytest.raises(errors.NonFiniteLossError, match=r"step 3\b"):
        train.train_and_evaluate(
            config, workdir, sources=helpers.fake_sources(), evaluate_at_end=False
        )
    assert _steps_in(workdir) == [2]
    restored, step = checkpoints.restore_model(workdir, "latest")
    assert step == 2
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored))


def test_missing_teacher_names_the_training_command(tmp_path):
    config = helpers.tiny_config("300w_distill", **{"distill.teacher_workdir": str(tmp_path / "t")})
    with pytest.raises(errors.TeacherError) as e:
        train.train_and_evaluate(config, str(tmp_path / "s"), sources=helpers.fake_sources())
    msg = str(e.value)
    assert "No teacher checkpoint" in msg
    assert (
        f"python -m fan_jax.main --config=configs/300w_teacher.py --workdir={tmp_path / 't'}" in msg
    )


def test_mismatched_teacher_is_a_clear_error(reference_run, tmp_path):
    teacher_dir, _ = reference_run
    # Another dataset's teacher.
    config = helpers.tiny_config("wflw_distill", **{"distill.teacher_workdir": teacher_dir})
    with pytest.raises(errors.TeacherError, match="trained on '300w'.*wflw"):
        heatmap_task.teacher_record(config)
    # Weights that do not fit the architecture the run config names.
    fake = tmp_path / "teacher"
    os.makedirs(fake)
    os.symlink(os.path.join(teacher_dir, "checkpoints"), fake / "checkpoints")
    with open(os.path.join(teacher_dir, "config.json")) as f:
        run_config = json.load(f)
    run_config["model"]["name"] = "tiny_teacher"
    (fake / "config.json").write_text(json.dumps(run_config))
    config = helpers.tiny_config("300w_distill", **{"distill.teacher_workdir": str(fake)})
    with pytest.raises(errors.TeacherError, match="shape.*does not fit model 'tiny_teacher'"):
        heatmap_task.load_teacher(config, 68)


def test_distillation_run_logs_each_term(reference_run, tmp_path, caplog):
    from tensorboard.backend.event_processing import event_accumulator

    teacher_dir, _ = reference_run
    workdir = str(tmp_path)
    config = helpers.tiny_config(
        "300w_distill",
        **{
            "model.name": "tiny_student",
            "distill.teacher_workdir": teacher_dir,
            "train.num_train_steps": 2,
            "train.eval_every_steps": 1,
            "train.keep_checkpoints": 1,
        },
    )
    caplog.set_level(py_logging.INFO)
    # Other tests in the same worker (TensorFlow imports) can leave absl at WARNING.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        result = train.train_and_evaluate(
            config, workdir, sources=helpers.fake_sources(), evaluate_at_end=False
        )
    finally:
        absl_logging.set_verbosity(verbosity)
    assert result.val_nme is not None and np.isfinite(result.val_nme)
    acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
    for term in ("loss", "heatmap", "fa1", "fa2", "fa3", "fs1", "fs2", "fs3"):
        assert f"train/{term}" in tags, tags
    assert "val/nme_full" in tags
    progress = [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]
    assert progress and "ETA" in progress[-1]
    # The student's checkpoint holds the student and its adapters, never the teacher.
    restored, _ = checkpoints.restore_model(workdir, "latest")
    assert set(restored["params"]) == {"student", "adapters"}


def _val_nmes(workdir):
    """{step: val NME} from the TensorBoard events."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
    acc.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("val/nme_full")}


def test_keeps_latest_and_best(tmp_path):
    workdir = str(tmp_path)
    config = _config(
        **{"train.eval_every_steps": 1, "train.keep_checkpoints": 1, "train.learning_rate": 0.05}
    )
    train.train_and_evaluate(config, workdir, sources=helpers.fake_sources(), evaluate_at_end=False)
    nmes = _val_nmes(workdir)
    assert sorted(nmes) == list(range(1, STEPS + 1))
    best = min(nmes, key=nmes.get)
    assert _steps_in(workdir) == sorted({best, STEPS})
    _restored, step = checkpoints.restore_model(workdir, "best")
    assert step == best


def test_eval_mode_writes_metrics(reference_run, tmp_path):
    teacher_dir, _ = reference_run
    workdir = str(tmp_path)
    os.symlink(os.path.join(teacher_dir, "checkpoints"), os.path.join(workdir, "checkpoints"))
    config = _config()
    results = train.evaluate_workdir(config, workdir, sources=helpers.fake_sources())
    assert set(results["full"]) == {"no_flip", "flip"}
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        saved = json.load(f)
    assert saved["full"]["no_flip"]["num_images"] == 4
    assert saved["full"]["no_flip"]["normalizer"] == "inter_ocular"


def test_input_size_must_be_a_multiple_of_32(tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        train.train_and_evaluate(
            _config(input_size=80), str(tmp_path), sources=helpers.fake_sources()
        )


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    """configs/demo.py's pipeline at toy scale: synthetic tree -> 300W builder -> three runs."""
    c = helpers.load_config("demo")
    c.model.name = "tiny_student"
    c.input_size = 64
    c.demo.num_train, c.demo.num_test, c.demo.image_size = 16, 6, 96
    c.demo.teacher_model = "tiny_teacher"
    c.demo.teacher_steps = c.demo.student_steps = 2
    c.train.batch_size = 4
    c.eval.batch_size = 4
    helpers.register_tiny_regressor()
    c.demo.kdloss_enabled = True  # as configs/demo_compare.py
    kd = c.demo.kdloss
    # The recipe's teachers: the demo's heatmap teacher, whole, read out by soft-argmax.
    from fan_jax.models import fan, regression

    regression.REGRESSORS["tiny_teacher_softargmax"] = lambda n, **_: regression.LandmarkRegressor(
        fan.MODELS["tiny_teacher"](n), regression.SoftArgmaxHead()
    )
    kd.model.name = "tiny_reg"
    kd.kd.teacher_model = "tiny_teacher_softargmax"
    kd.input_size, kd.train.num_train_steps, kd.train.batch_size = 64, 2, 4
    kd.eval.batch_size, kd.kd.asm_augmentations = 4, 1
    kd.kd.teacher_steps = 2
    # tiny_reg's trunk is not tiny_student's: nothing to start the student from here.
    kd.kd.student_init_from_demo = False
    rows = demo.run_demo(c, str(tmp_path))
    assert list(rows) == [
        "teacher",
        "MobileFAN",
        "MobileFAN + KD",
        "KD-Loss Tough teacher",
        "KD-Loss Tolerant teacher",
        "MobileNetV2 regression alone",
        "MobileNetV2 regression + KD-Loss",
    ]
    for res in rows.values():
        assert set(res) == {"full", "common", "challenging"}
        assert res["full"]["flip"]["num_images"] == 6
    out = capsys.readouterr().out
    assert "MobileFAN + KD" in out and "NME %" in out
    assert "MobileNetV2 regression + KD-Loss" in out
    for f in (
        "demo_table.txt",
        "demo_nme.png",
        "teacher/eval/ced_300w.png",
        "mobilefan_kd/eval/metrics.json",
        "kdloss/student/eval/metrics.json",
        "kdloss/student_alone/eval/metrics.json",
    ):
        assert os.path.exists(tmp_path / f), f
