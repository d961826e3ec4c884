"""Tests for configs/ and the command line: every config is locked, follows the paper's
recipe, builds its model, and (slow) trains one step on tiny inputs; config errors fail
loudly with useful messages."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from fan_jax import data, train
from fan_jax.models import fan

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers

LAMBDA = {"wflw": 1e-4, "300w": 1e-4, "cofw": 1e-2}
KINDS = ("teacher", "mobilefan", "mobilefan_0.5", "distill", "distill_0.5")
EXPERIMENTS = [f"{ds}_{kind}" for ds in LAMBDA for kind in KINDS]


def _heatmap_configs():
    names = []
    for name in helpers.config_names():
        if name == "default":
            continue
        # Every file in configs/ is an experiment with get_config(): one that fails to load
        # fails here, not silently drops out of the parametrised tests.
        c = helpers.load_config(name)
        if c.model.get("kind", "heatmap") == "heatmap":
            names.append(name)
    return names


def test_every_experiment_has_a_config():
    assert set(EXPERIMENTS) <= set(_heatmap_configs())


@pytest.mark.parametrize("name", _heatmap_configs())
def test_config_is_locked_and_builds_its_model(name):
    c = helpers.load_config(name)
    c.lock()
    with pytest.raises(AttributeError):
        c.train.bach_size = 3
    assert c.dataset.name in data.DATASETS
    assert c.model.name in fan.MODELS
    num_landmarks = data.get(c.dataset.name).num_landmarks
    model = fan.build_model(c.model.name, num_landmarks)
    x = jnp.zeros((1, 64, 64, 3))
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    hm, taps = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    assert hm.shape == (1, 16, 16, num_landmarks)
    assert [t.shape[1] for t in taps] == [4, 8, 16]
    if name in EXPERIMENTS:  # the paper's recipe
        assert (c.train.batch_size, c.train.num_epochs, c.train.learning_rate) == (8, 80, 1e-3)
        assert tuple(c.train.lr_decay_epochs) == (30, 50) and c.train.lr_decay_factor == 0.1
        assert c.distill.lam == LAMBDA[c.dataset.name]
        assert c.input_size == 256 and c.sigma == 1.0
        assert c.distill.enabled == ("distill" in name)
    if c.distill.enabled:
        teacher_config = os.path.join(helpers.REPO_ROOT, c.distill.teacher_config)
        assert os.path.exists(teacher_config), c.distill.teacher_config
        t = helpers.load_config(os.path.basename(teacher_config)[:-3])
        assert t.dataset.name == c.dataset.name and not t.distill.enabled
        assert all(len(x) == 3 for x in (c.distill.fa_layers, c.distill.fs_layers))
        adapters = fan.Adapters(
            fan.teacher_channels(fan.build_model(t.model.name, num_landmarks)),
            kind=c.distill.adapter_kind,
        )
        adapted = jax.eval_shape(lambda t: adapters.init_with_output(jax.random.key(0), t)[0], taps)
        assert [a.shape[-1] for a in adapted] == [256] * 3


def _main(*args, cwd=helpers.REPO_ROOT, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "fan_jax.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def test_cli_unknown_field_fails(tmp_path):
    r = _main(
        "--config=configs/wflw_mobilefan.py", "--config.train.bach_size=3", f"--workdir={tmp_path}"
    )
    assert r.returncode != 0
    assert "bach_size" in r.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_cli_missing_teacher_names_the_command(tmp_path):
    teacher = tmp_path / "no_teacher_here"
    # From another directory: configs resolve relative to the checkout either way.
    r = _main(
        f"--config={helpers.REPO_ROOT}/configs/cofw_distill.py",
        f"--config.distill.teacher_workdir={teacher}",
        f"--workdir={tmp_path / 's'}",
        cwd=str(tmp_path),
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert (
        f"python -m fan_jax.main --config=configs/cofw_teacher.py --workdir={teacher}" in r.stderr
    )


def test_cli_missing_dataset_prints_download_instructions(tmp_path):
    empty = tmp_path / "manual"
    empty.mkdir()
    r = _main(
        "--config=configs/cofw_mobilefan.py",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        f"--config.dataset.manual_dir={empty}",
        f"--workdir={tmp_path / 'w'}",
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "COFW_train_color.mat" in r.stderr
    assert "Traceback" not in r.stderr


def _one_step(name, workdir, num_landmarks, test_split, **overrides):
    c = helpers.tiny_config(
        name, **{"train.batch_size": 2, "train.num_train_steps": 1, **overrides}
    )
    sources = helpers.fake_sources(
        num_train=2, num_test=2, num_landmarks=num_landmarks, test_split=test_split
    )
    result = train.train_and_evaluate(c, workdir, sources=sources, evaluate_at_end=False)
    assert result.step == 1
    return result


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(LAMBDA))
def test_every_config_trains_one_step(dataset, tmp_path):
    """The real networks of every config, one step at 64x64 (teacher first: the KD runs load it)."""
    spec = data.get(dataset)
    L, split = spec.num_landmarks, spec.test_splits[0]
    teacher_dir = str(tmp_path / "teacher")
    _one_step(f"{dataset}_teacher", teacher_dir, L, split)
    for kind in ("mobilefan", "mobilefan_0.5"):
        _one_step(f"{dataset}_{kind}", str(tmp_path / kind), L, split)
    for kind in ("distill", "distill_0.5"):
        r = _one_step(
            f"{dataset}_{kind}",
            str(tmp_path / kind),
            L,
            split,
            **{"distill.teacher_workdir": teacher_dir},
        )
        assert set(r.state.params) == {"student", "adapters"}
