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
