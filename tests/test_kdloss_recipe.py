"""The KD-Loss demo recipe's parts: an encoder started from another run (`model.init_from`),
the flattening head that starts at the crop centre, the student trained alone (the baseline
row), and warm-up on the inverse-time schedule. The recipe's accuracy is measured by the demo
(slow: tests/test_train.py::test_demo_end_to_end and the README's sweep)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fan_jax import checkpoints, optim, train
from fan_jax.errors import TeacherError
from fan_jax.models import regression
from fan_jax.tasks import kdloss

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers
import test_kd_train as kd_helpers


def tiny_reg_like_fan(num_landmarks: int, dropout_rate: float = 0.1, pool: str = "avg"):
    """The regression head on tiny_student's own trunk, so its encoder can start from one."""
    return regression.LandmarkRegressor(
        helpers.tiny_encoder_cls()(),
        regression.RegressionHead(num_landmarks, dropout_rate, pool=pool),
    )


@pytest.fixture()
def registered(monkeypatch):
    monkeypatch.setitem(regression.REGRESSORS, "tiny_reg_fan", tiny_reg_like_fan)
    monkeypatch.setitem(regression.REGRESSORS, "tiny_reg", helpers.tiny_regressor)


@pytest.fixture(scope="module")
def heatmap_run(tmp_path_factory):
    return helpers.tiny_student_workdir(str(tmp_path_factory.mktemp("heatmap_run")))


def test_student_alone_starts_from_a_heatmap_run_and_trains_through_the_loop(
    registered, heatmap_run, tmp_path
):
    c = kd_helpers.tiny_config("student", str(tmp_path))
    c.kd.role = kdloss.ALONE
    c.model.name = "tiny_reg_fan"
    c.model.head_pool = "flatten"
    c.model.init_from = heatmap_run
    model = kdloss.build_model(c, 68)
    params, stats = kdloss.init_variables(c, model, jax.random.key(0))
    src = checkpoints.load_model(heatmap_run, "latest").variables
    for ours, theirs in (
        (params["student"], src["params"]),
        (stats["student"], src["batch_stats"]),
    ):
        a = traverse_util.flatten_dict(ours["encoder"])
        b = traverse_util.flatten_dict(theirs["encoder"])
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    # The flattening head starts every landmark at the crop centre.
    out = model.apply(
        {"params": params["student"], "batch_stats": stats["student"]},
        jnp.ones((2, 64, 64, 3)),
        train=False,
    )
    np.testing.assert_allclose(np.asarray(out), 0.5)
    # Through the loop: the baseline run trains, evaluates and records its role and head.
    result = train.train_and_evaluate(c, str(tmp_path / "alone"), sources=kd_helpers.sources())
    assert result.eval_results["test"]["no_flip"]["nme"] > 0
    loaded = checkpoints.load_model(str(tmp_path / "alone"), "latest")
    assert loaded.record["kd"]["role"] == kdloss.ALONE
    assert loaded.model.head.pool == "flatten"


def test_init_from_a_run_of_another_trunk_names_the_flag(registered, heatmap_run, tmp_path):
    c = kd_helpers.tiny_config("student", str(tmp_path))
    c.model.init_from = heatmap_run  # tiny_reg's trunk is narrower than tiny_student's
    model = kdloss.build_model(c, 68)
    with pytest.raises(TeacherError, match="model.init_from=.*does not fit"):
        kdloss.init_variables(c, model, jax.random.key(0))
    c.model.init_from = str(tmp_path / "nowhere")
    with pytest.raises(TeacherError, match="model.init_from="):
        kdloss.init_variables(c, model, jax.random.key(0))


def test_warmup_scales_the_inverse_time_schedule():
    c = kd_helpers.load_config("demo_kdloss")
    _, schedule = optim.make_optimizer(c, 100)
    lr, decay, warm = c.train.learning_rate, c.train.lr_inverse_time_decay, c.train.warmup_steps
    for step in (0, warm // 2, warm, 4 * warm):
        want = min(step / warm, 1.0) * lr / (1 + decay * step)
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5)


def _soft_argmax_reference(hm: np.ndarray, beta: float) -> np.ndarray:
    """Pixel by pixel, in float64: sum over pixels of softmax(beta h) * the pixel centre."""
    b, h, w, n = hm.shape
    out = np.zeros((b, n, 2))
    for i in range(b):
        for k in range(n):
            e = np.exp(beta * (hm[i, :, :, k] - hm[i, :, :, k].max()))
            e /= e.sum()
            for y in range(h):
                for x in range(w):
                    out[i, k] += e[y, x] * np.array([(x + 0.5) / w, (y + 0.5) / h])
    return out


def test_soft_argmax_head_matches_a_pixel_loop_and_finds_a_peak():
    rng = np.random.default_rng(0)
    hm = rng.standard_normal((2, 8, 6, 3)).astype(np.float32) * 0.2
    head = regression.SoftArgmaxHead(beta_init=7.0)
    v = head.init(jax.random.key(0), jnp.asarray(hm))
    out = np.asarray(head.apply(v, jnp.asarray(hm)))
    np.testing.assert_allclose(out, _soft_argmax_reference(hm, 7.0), atol=1e-5)
    # A FAN's (heatmaps, taps) works too; a sharp peak reads out at that pixel's centre.
    peak = np.zeros((1, 8, 6, 1), np.float32)
    peak[0, 5, 2, 0] = 1.0
    sharp = regression.SoftArgmaxHead(beta_init=100.0)
    out = np.asarray(sharp.apply(sharp.init(jax.random.key(0), peak), (jnp.asarray(peak), ())))
    np.testing.assert_allclose(out[0, 0], [2.5 / 6, 5.5 / 8], atol=1e-6)


def test_soft_argmax_teacher_takes_a_heatmap_runs_whole_network(monkeypatch, heatmap_run, tmp_path):
    """`resnet18_fan_softargmax`'s layout on a tiny FAN: init_from copies the heatmap run's
    trunk, decoder and head, so the teacher reads out that run's own heatmaps."""
    monkeypatch.setitem(
        regression.REGRESSORS,
        "tiny_fan_softargmax",
        lambda n, **_: regression.LandmarkRegressor(
            helpers.tiny_fan(n), regression.SoftArgmaxHead()
        ),
    )
    c = kd_helpers.tiny_config("teacher_tough", str(tmp_path))
    c.model.name = "tiny_fan_softargmax"
    c.model.init_from = heatmap_run
    model = kdloss.build_model(c, 68)
    params, stats = kdloss.init_variables(c, model, jax.random.key(0))
    src = checkpoints.load_model(heatmap_run, "latest")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 64, 3)), jnp.float32)
    hm = np.asarray(src.model.apply(src.variables, x, train=False)[0])
    out = model.apply({"params": params["student"], "batch_stats": stats["student"]}, x)
    np.testing.assert_allclose(np.asarray(out), _soft_argmax_reference(hm, 20.0), atol=1e-4)
    # Through the loop: it trains as the Tough teacher and a student's run loads it frozen.
    res = train.train_and_evaluate(c, c.kd.tough_workdir, sources=kd_helpers.sources())
    assert res.eval_results["test"]["no_flip"]["nme"] > 0
    student = kd_helpers.tiny_config("student", str(tmp_path))
    teacher, variables = kdloss.load_teacher(student, "teacher_tough", 68)
    assert teacher.apply(variables, x).shape == (2, 68, 2)
