"""A workdir is never corrupted, and errors reach the user as one line (issue: workdir safety).

The run's config.json is its record: written after the model is built and any checkpoint
restored, atomically; a rerun that disagrees fails and leaves every byte where it was; readers
build the model from it. The config is validated up front; the CLI turns the project's errors
into `ERROR:` lines and a preempted run exits 75.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fan_jax import errors, record, synthetic_300w, train, validate

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers

helpers.register_tiny_models()


def _config(**overrides):
    base = {
        "model.name": "tiny_student",
        "train.num_train_steps": 2,
        "train.checkpoint_every_steps": 1,
    }
    base.update(overrides)
    return helpers.tiny_config("300w_mobilefan", **base)


def _snapshot(root) -> dict[str, str]:
    """Every file under root with the hash of its bytes (and its mtime, to catch rewrites)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (
                    hashlib.sha256(fh.read()).hexdigest(),
                    os.stat(p).st_mtime_ns,
                )
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step tiny run at 64 px: (workdir, config)."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    c = _config()
    r = train.train_and_evaluate(c, workdir, sources=helpers.fake_sources(), evaluate_at_end=False)
    assert r.step == 2
    return workdir, c


def _copy(workdir, tmp_path):
    import shutil

    dst = str(tmp_path / "copy")
    shutil.copytree(workdir, dst)
    return dst


# ------------------------------------------------------------------------- 1. the record


@pytest.mark.parametrize(
    "override,field",
    [
        ({"model.name": "tiny_teacher"}, "model.name"),
        ({"input_size": 96}, "input_size"),
        ({"dataset.name": "wflw"}, "dataset.name"),
    ],
)
def test_rerun_with_other_model_or_data_changes_nothing(trained, tmp_path, override, field):
    workdir = _copy(trained[0], tmp_path)
    before = _snapshot(workdir)
    with pytest.raises(errors.RecordMismatchError) as info:
        train.train_and_evaluate(
            _config(**override, **{"train.allow_changes": True}),
            workdir,
            sources=helpers.fake_sources(),
            evaluate_at_end=False,
        )
    message = str(info.value)
    with open(os.path.join(workdir, "config.json")) as f:
        old = json.load(f)
    node = old
    for p in field.split("."):
        node = node[p]
    assert f"{field}: {node!r} in the record, {next(iter(override.values()))!r} now" in message
    assert _snapshot(workdir) == before


def test_rerun_with_a_typo_changes_nothing(trained, tmp_path):
    workdir = _copy(trained[0], tmp_path)
    before = _snapshot(workdir)
    with pytest.raises(errors.ConfigError, match="model.name: unknown model 'mobilfan'"):
        train.train_and_evaluate(
            _config(**{"model.name": "mobilfan"}),
            workdir,
            sources=helpers.fake_sources(),
            evaluate_at_end=False,
        )
    assert _snapshot(workdir) == before


def test_other_settings_need_allow_changes(trained, tmp_path):
    workdir = _copy(trained[0], tmp_path)
    before = _snapshot(workdir)
    with pytest.raises(
        errors.RecordMismatchError,
        match=r"(?s)train.num_train_steps: 2 in the "
        r"record, 3 now.*allow_changes",
    ):
        train.train_and_evaluate(
            _config(**{"train.num_train_steps": 3}),
            workdir,
            sources=helpers.fake_sources(),
            evaluate_at_end=False,
        )
    assert _snapshot(workdir) == before
    r = train.train_and_evaluate(
        _config(**{"train.num_train_steps": 3, "train.allow_changes": True}),
        workdir,
        sources=helpers.fake_sources(),
        evaluate_at_end=False,
    )
    assert r.step == 3
    assert record.read_record(workdir)["train"]["num_train_steps"] == 3


def test_record_is_written_after_restore_and_atomically(tmp_path, monkeypatch):
    """A model that cannot be built leaves no record; the record never appears half-written."""
    workdir = str(tmp_path / "w")
    written = []
    real = record.write_record

    def spy(config, wd):
        # By the time the record is written the run has its checkpoint manager open.
        written.append(os.path.isdir(os.path.join(wd, "checkpoints")))
        real(config, wd)

    monkeypatch.setattr(record, "write_record", spy)
    train.train_and_evaluate(
        _config(), workdir, sources=helpers.fake_sources(), evaluate_at_end=False
    )
    assert written == [True]
    assert not os.path.exists(os.path.join(workdir, "config.json.tmp"))
    assert record.read_record(workdir)["model"]["name"] == "tiny_student"


# ------------------------------------------------------------------------- 2. the tree check


def test_resume_into_another_model_names_the_parameter(trained, tmp_path):
    """Without a record (a workdir from before records were checked) the restore's own tree
    check names the first differing parameter and both shapes."""
    workdir = _copy(trained[0], tmp_path)
    os.remove(os.path.join(workdir, "config.json"))
    with pytest.raises(
        errors.CheckpointMismatchError,
        match=r"checkpoints/2: (params|batch_stats)/student/\S+ has shape \([\d, ]+\) in "
        r"the checkpoint, \([\d, ]+\) in the model",
    ):
        train.train_and_evaluate(
            _config(**{"model.name": "tiny_teacher"}),
            workdir,
            sources=helpers.fake_sources(),
            evaluate_at_end=False,
        )
    assert not os.path.exists(os.path.join(workdir, "config.json"))


# ------------------------------------------------------------------------- 3. eval mode


def test_eval_mode_builds_the_model_from_the_record(trained, tmp_path):
    workdir = _copy(trained[0], tmp_path)
    sources = helpers.fake_sources()
    right = train.evaluate_workdir(_config(), workdir, sources=sources)
    # The config file's defaults (256 px crops) are not what was trained: the record wins.
    default = helpers.tiny_config("300w_mobilefan")
    default.input_size = 256
    got = train.evaluate_workdir(default, workdir, sources=sources, overrides={})
    for split in right:
        assert got[split]["no_flip"]["nme"] == pytest.approx(right[split]["no_flip"]["nme"])
    # ... and an explicit override that contradicts the record is an error.
    with pytest.raises(errors.RecordMismatchError, match=r"input_size: 64 in the record, 256 now"):
        train.evaluate_workdir(default, workdir, sources=sources, overrides={"input_size": 256})


def test_readme_and_default_agree_on_the_scored_checkpoint():
    with open(os.path.join(helpers.REPO_ROOT, "README.md")) as f:
        readme = f.read()
    default = helpers.load_config("default").eval.checkpoint
    assert f"`eval.checkpoint` (default `{default}`" in readme


# ------------------------------------------------------------------------- 4. validation


def test_config_problems_are_listed_together():
    c = _config(
        **{
            "train.batch_size": 0,
            "input_size": 100,
            "augment.p_flip": 1.5,
            "distill.fa_layers": (True, True),
            "eval.checkpoint": "newest",
        }
    )
    with pytest.raises(errors.ConfigError) as info:
        validate.check(c)
    text = str(info.value)
    for field in (
        "train.batch_size",
        "input_size",
        "augment.p_flip",
        "distill.fa_layers",
        "eval.checkpoint",
    ):
        assert f"\n  {field}: " in text, text
    assert len(info.value.problems) == 5


def test_batch_size_must_divide_over_the_devices():
    assert validate.problems(_config(**{"train.batch_size": 8}), num_devices=4) == []
    (p,) = validate.problems(_config(**{"train.batch_size": 6}), num_devices=4)
    assert p.startswith("train.batch_size: 6 is not divisible by the 4 devices")


def test_every_config_in_configs_is_valid():
    for name in helpers.config_names():
        assert validate.problems(helpers.load_config(name)) == [], name


# ------------------------------------------------------------------------- 5./6. the CLI


def _main(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "fan_jax.main", *args],
        capture_output=True,
        text=True,
        cwd=helpers.REPO_ROOT,
        env=env,
        timeout=timeout,
    )


def _assert_one_error_line(r, *needles):
    assert r.returncode == errors.EXIT_ERROR, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    tail = r.stderr[r.stderr.index("ERROR: ") :]
    for n in needles:
        assert n in tail, tail


def test_cli_batch_size_zero(tmp_path):
    r = _main(
        "--config=configs/300w_mobilefan.py",
        "--config.train.batch_size=0",
        f"--workdir={tmp_path / 'w'}",
    )
    _assert_one_error_line(r, "train.batch_size: must be a positive integer, got 0")
    assert not os.path.exists(tmp_path / "w")


def test_cli_bad_model_name(tmp_path):
    r = _main(
        "--config=configs/300w_mobilefan.py",
        "--config.model.name=mobilfan",
        f"--workdir={tmp_path / 'w'}",
    )
    _assert_one_error_line(r, "model.name: unknown model 'mobilfan'")


def test_cli_eval_conflicting_override(trained, tmp_path):
    workdir = _copy(trained[0], tmp_path)
    before = _snapshot(workdir)
    r = _main(
        "--config=configs/300w_mobilefan.py",
        "--mode=eval",
        "--config.input_size=128",
        f"--workdir={workdir}",
    )
    _assert_one_error_line(r, "input_size: 64 in the record, 128 now")
    assert _snapshot(workdir) == before


def test_cli_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    manual = tmp_path / "manual"
    synthetic_300w.write_300w_tree(str(manual), num_train=8, num_test=4, size=96)
    r = _main(
        "--config=configs/300w_mobilefan.py",
        f"--config.dataset.manual_dir={manual}",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        "--config.input_size=64",
        f"--workdir={blocker / 'run'}",
    )
    _assert_one_error_line(r, str(blocker))


def test_cli_malformed_dataset_file(tmp_path):
    manual = tmp_path / "manual"
    synthetic_300w.write_300w_tree(str(manual), num_train=8, num_test=4, size=96)
    pts = sorted((manual / "helen" / "trainset").glob("*.pts"))[0]
    pts.write_text(pts.read_text().replace("n_points:  68", "n_points:  67"))
    r = _main(
        "--config=configs/300w_mobilefan.py",
        f"--config.dataset.manual_dir={manual}",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        "--config.input_size=64",
        f"--workdir={tmp_path / 'w'}",
    )
    _assert_one_error_line(r, pts.name)


def test_cli_sigterm_exits_75_and_resumes(tmp_path):
    manual = tmp_path / "manual"
    synthetic_300w.write_300w_tree(str(manual), num_train=8, num_test=4, size=96)
    args = [
        "--config=configs/300w_mobilefan_0.5.py",
        f"--config.dataset.manual_dir={manual}",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        "--config.input_size=64",
        "--config.train.batch_size=2",
        "--config.train.num_train_steps=100000",
        "--config.train.log_every_steps=1",
        "--config.train.eval_every_steps=-1",
        "--config.train.checkpoint_every_steps=100000",
        f"--workdir={tmp_path / 'w'}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fan_jax.main", *args],
        cwd=helpers.REPO_ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    seen = []
    deadline = time.time() + 500
    try:
        for line in proc.stderr:
            seen.append(line)
            if "first step (with compilation)" in line:
                proc.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline, "".join(seen[-30:])
        rest = proc.stderr.read()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == errors.EXIT_PREEMPTED, "".join(seen[-20:]) + rest[-3000:]
    assert "PREEMPTED" in rest and "Traceback" not in rest
    saved = [int(p) for p in os.listdir(tmp_path / "w" / "checkpoints") if p.isdigit()]
    assert saved and 0 < max(saved) < 100000
    assert np.isfinite(max(saved))
