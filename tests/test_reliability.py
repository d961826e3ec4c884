"""Reliability through the command lines: one run per workdir, every failure path as one named
`ERROR:` line, nothing already written lost (issue: reliability).

Each case drives `python -m fan_jax.main`, `python -m fan_jax.data` or `fan_jax.predict`'s
main the way the README does, on a synthetic 300W tree built by the real builder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from fan_jax import checkpoints, data, errors, predict, synthetic_300w, workdir_lock

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers

helpers.register_tiny_models()


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env.pop("TFDS_DATA_DIR", None)
    return env


def _main(*args, timeout=600, **env):
    return subprocess.run(
        [sys.executable, "-m", "fan_jax.main", *args],
        capture_output=True,
        text=True,
        cwd=helpers.REPO_ROOT,
        env=_env(**env),
        timeout=timeout,
    )


def _assert_one_error_line(returncode, stderr, *needles, status=errors.EXIT_ERROR):
    assert returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("ERROR: ")]
    assert len(lines) == 1, stderr[-3000:]
    tail = stderr[stderr.index("ERROR: ") :]
    for n in needles:
        assert n in tail, tail


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A synthetic 300W download (8 train, 4 test faces) and an empty data_dir beside it."""
    root = tmp_path_factory.mktemp("w300")
    synthetic_300w.write_300w_tree(str(root / "manual"), num_train=8, num_test=4, size=96)
    return root


def _train_args(tree, workdir, *extra):
    return [
        "--config=configs/300w_mobilefan_0.5.py",
        f"--config.dataset.manual_dir={tree / 'manual'}",
        f"--config.dataset.data_dir={tree / 'tfds'}",
        "--config.input_size=64",
        "--config.train.batch_size=2",
        "--config.train.log_every_steps=1",
        "--config.train.eval_every_steps=-1",
        f"--workdir={workdir}",
        *extra,
    ]


def _start(args):
    return subprocess.Popen(
        [sys.executable, "-m", "fan_jax.main", *args],
        cwd=helpers.REPO_ROOT,
        env=_env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def _read_until(proc, needle, timeout=500):
    seen = []
    deadline = time.time() + timeout
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return "".join(seen)
        assert time.time() < deadline, "".join(seen[-30:])
    raise AssertionError(f"{needle!r} never printed:\n" + "".join(seen[-30:]))


# ------------------------------------------------------------------------- 1. one run per workdir


def test_second_run_eval_and_rerun_after_kill_9(tree, tmp_path):
    """A run holds the workdir: a second run and an eval started while it trains fail at once
    naming its pid and host; after kill -9 the same command runs again (no stale lock)."""
    workdir = tmp_path / "w"
    args = _train_args(
        tree,
        workdir,
        "--config.train.num_train_steps=100000",
        "--config.train.checkpoint_every_steps=100000",
    )
    first = _start(args)
    try:
        _read_until(first, "first step (with compilation)")
        assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text())["pid"] == first.pid
        t0 = time.perf_counter()
        second = _main(*args)
        fast = time.perf_counter() - t0
        _assert_one_error_line(
            second.returncode,
            second.stderr,
            str(workdir),
            f"pid {first.pid}",
            "in use by another run",
        )
        assert "Training" not in second.stderr and "Resumed" not in second.stderr
        evaluation = _main(
            "--config=configs/300w_mobilefan_0.5.py", "--mode=eval", f"--workdir={workdir}"
        )
        _assert_one_error_line(evaluation.returncode, evaluation.stderr, f"pid {first.pid}")
        assert not (workdir / "eval").exists()
        print(f"second run refused after {fast:.1f}s")
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock goes with the process
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    third = _start(args)
    try:
        _read_until(third, "first step (with compilation)")
        third.send_signal(signal.SIGTERM)
        rest = third.stderr.read()
        third.wait(timeout=300)
    finally:
        if third.poll() is None:
            third.kill()
    assert third.returncode == errors.EXIT_PREEMPTED, rest[-3000:]
    assert not (workdir / workdir_lock.LOCK_FILE).exists()  # removed on a clean exit


def test_two_runs_started_together(tree, tmp_path):
    workdir = tmp_path / "w"
    args = _train_args(
        tree, workdir, "--config.train.num_train_steps=4", "--config.train.checkpoint_every_steps=2"
    )
    # The dataset is built first so both runs race for the workdir, not for the build.
    data.prepare("300w", str(tree / "tfds"), str(tree / "manual"))
    procs = [_start(args) for _ in range(2)]
    outs = []
    for p in procs:
        outs.append(p.stderr.read())
        p.wait(timeout=600)
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, errors.EXIT_ERROR], [o[-2000:] for o in outs]
    loser = outs[[p.returncode for p in procs].index(errors.EXIT_ERROR)]
    winner = procs[[p.returncode for p in procs].index(0)]
    _assert_one_error_line(1, loser, str(workdir), f"pid {winner.pid}")
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps == [2, 4]


def test_lock_is_reentrant_in_one_process_and_exclusive_across(tmp_path):
    workdir = str(tmp_path / "w")
    with workdir_lock.hold(workdir):
        with workdir_lock.hold(workdir, "evaluation"):
            pass
        code = (
            "import sys; from fan_jax import workdir_lock\n"
            "try:\n with workdir_lock.hold(sys.argv[1]): pass\n"
            "except workdir_lock.WorkdirLockedError as e: print(e); sys.exit(3)"
        )
        r = subprocess.run(
            [sys.executable, "-c", code, workdir], capture_output=True, text=True, env=_env()
        )
        assert r.returncode == 3 and f"pid {os.getpid()}" in r.stdout, r.stdout + r.stderr
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


# ------------------------------------------------------------------------- 2. one named line


def _zero_byte_first_image(manual):
    image = sorted((manual / "helen" / "trainset").glob("*.jpg"))[0]
    image.write_bytes(b"")
    return image


def test_zero_byte_image_is_named_by_both_clis(tmp_path, capsys):
    manual = tmp_path / "manual"
    synthetic_300w.write_300w_tree(str(manual), num_train=8, num_test=4, size=96)
    image = _zero_byte_first_image(manual)
    assert (
        data.main(["300w", "--data_dir", str(tmp_path / "tfds"), "--manual_dir", str(manual)]) == 1
    )
    err = capsys.readouterr().err
    _assert_one_error_line(1, err, image.name, "empty (0 bytes)")
    r = _main(
        "--config=configs/300w_mobilefan_0.5.py",
        f"--config.dataset.manual_dir={manual}",
        f"--config.dataset.data_dir={tmp_path / 'tfds2'}",
        "--config.input_size=64",
        f"--workdir={tmp_path / 'w'}",
    )
    _assert_one_error_line(r.returncode, r.stderr, image.name, "empty (0 bytes)")


def test_zero_byte_and_empty_images_in_wflw_and_cofw(tmp_path, capsys):
    from fan_jax_datasets.cofw import cofw_dataset_builder as cofw
    from fan_jax_datasets.cofw import fixtures as cofw_fixtures
    from fan_jax_datasets.wflw import fixtures as wflw_fixtures

    wflw_fixtures.write_fixture(str(tmp_path / "wflw"), extracted=True)
    image = sorted((tmp_path / "wflw").rglob("*.jpg"))[0]
    image.write_bytes(b"")
    assert (
        data.main(
            ["wflw", "--data_dir", str(tmp_path / "d1"), "--manual_dir", str(tmp_path / "wflw")]
        )
        == 1
    )
    _assert_one_error_line(1, capsys.readouterr().err, image.name, "0 bytes")

    manual = tmp_path / "cofw"
    cofw_fixtures.write_fixture(str(manual))
    file_name, images_var, phis_var, boxes_var = cofw.FILES["train"]
    mat = cofw.MatFile(str(manual / file_name), images_var, phis_var, boxes_var)
    n = len(mat.refs)
    images = [mat.image(i) for i in range(n)]
    phis = np.stack(
        [
            np.concatenate(
                [
                    mat.landmarks(i)[:, 0] + 1,
                    mat.landmarks(i)[:, 1] + 1,
                    mat.occluded(i).astype(np.float64),
                ]
            )
            for i in range(n)
        ]
    )
    boxes = np.stack([mat.box(i) for i in range(n)])
    mat.close()
    images[1] = np.zeros((0, 0, 3), np.uint8)
    cofw_fixtures.write_mat(
        str(manual / file_name), images_var, phis_var, boxes_var, images, phis, boxes
    )
    assert data.main(["cofw", "--data_dir", str(tmp_path / "d2"), "--manual_dir", str(manual)]) == 1
    _assert_one_error_line(1, capsys.readouterr().err, file_name, f"{images_var}[1]")


def _tmpfs(path, size_mb):
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs root")


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_last(tree, tmp_path):
    """A 30 MB filesystem holds one MobileFAN-0.5 checkpoint (about 22 MB) but not two."""
    disk = tmp_path / "disk"
    _tmpfs(disk, 30)
    try:
        workdir = disk / "w"
        r = _main(
            *_train_args(
                tree,
                workdir,
                "--config.train.num_train_steps=40",
                "--config.train.checkpoint_every_steps=2",
            )
        )
        _assert_one_error_line(
            r.returncode,
            r.stderr,
            str(workdir / "checkpoints"),
            "No space left on device",
            "last good checkpoint (step 2)",
        )
        loaded = checkpoints.load_model(str(workdir), "latest")
        assert loaded.step == 2
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_save_errors_name_the_directory_and_the_cause(tmp_path):
    """The wrapper alone, on orbax's way of reporting a writer thread's failure."""

    class Manager:
        directory = tmp_path / "checkpoints"

        def all_steps(self):
            return [3, 6, 9]

    with pytest.raises(errors.CheckpointSaveError) as info, checkpoints.save_errors(Manager(), 9):
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "x": Failed to write 1 bytes '
            "to file 7: No space left on device [os_error_code='28']"
        )
    msg = str(info.value)
    assert str(tmp_path / "checkpoints") in msg and "No space left on device" in msg
    assert "(step 6)" in msg
    with (
        pytest.raises(errors.CheckpointSaveError, match="Read-only file system"),
        checkpoints.save_errors(Manager(), 1),
    ):
        raise OSError(30, os.strerror(30))


def test_misspelt_config_field_and_missing_config_file(tmp_path):
    r = _main(
        "--config=configs/300w_mobilefan.py",
        "--config.train.num_train_stepz=3",
        f"--workdir={tmp_path / 'w'}",
    )
    _assert_one_error_line(
        r.returncode, r.stderr, "--config.train.num_train_stepz", 'Did you mean "num_train_steps"'
    )
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _main("--config=configs/300w_mobilefn.py", f"--workdir={tmp_path / 'w'}")
    _assert_one_error_line(
        r.returncode, r.stderr, "configs/300w_mobilefn.py", "No such file or directory"
    )
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------- 3. nothing lost


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return helpers.tiny_student_workdir(str(tmp_path_factory.mktemp("student")))


def test_outputs_of_an_unreadable_video_leave_old_files(student, tmp_path, capsys):
    old_json, old_video = tmp_path / "out.jsonl", tmp_path / "out.avi"
    old_json.write_text("precious\n" * 4000)
    old_video.write_bytes(b"an earlier video" * 1000)
    garbage = tmp_path / "clip.mp4"
    garbage.write_bytes(b"not a video" * 100)
    status = predict.main(
        [
            "--workdir",
            student,
            "--which",
            "latest",
            str(garbage),
            "-o",
            str(old_json),
            "--draw",
            str(old_video),
        ]
    )
    assert status == 1
    assert "ERROR: " in capsys.readouterr().err
    assert old_json.read_text() == "precious\n" * 4000
    assert old_video.read_bytes() == b"an earlier video" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "out.avi", "out.jsonl"]


def test_outputs_of_a_readable_video_replace_old_files(student, tmp_path, capsys):
    import cv2
    from skimage import data as skdata

    clip = tmp_path / "clip.avi"
    frame = cv2.resize(skdata.astronaut(), (128, 128))
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (128, 128))
    for _ in range(5):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    out = tmp_path / "out.jsonl"
    out.write_text("old\n" * 100)
    predict.main(
        [
            "--workdir",
            student,
            "--which",
            "latest",
            str(clip),
            "-o",
            str(out),
            "--box",
            "16,16,112,112",
            "--min_score",
            "-1",
        ]
    )
    capsys.readouterr()
    lines = out.read_text().splitlines()
    assert [json.loads(x)["frame"] for x in lines] == list(range(5))
    assert not any(p.name.endswith(".partial.jsonl") for p in tmp_path.iterdir())


# ------------------------------------------------------------------------- 4. eval from the record


def test_eval_with_no_flags_uses_the_records_data(tree, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    workdir = tmp_path / "w"
    r = _main(*_train_args(tree, workdir, "--config.train.num_train_steps=2"), HOME=str(home))
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(workdir / "eval")
    before = sorted(str(p) for p in home.rglob("*"))  # ~/.keras: TensorFlow's import makes it
    r = _main(
        "--config=configs/300w_mobilefan_0.5.py",
        "--mode=eval",
        f"--workdir={workdir}",
        HOME=str(home),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (workdir / "eval").is_dir()
    assert sorted(str(p) for p in home.rglob("*")) == before, "eval wrote outside the workdir"
    assert not (home / "tensorflow_datasets").exists()
    # A flag still overrides the path; a data_dir without the dataset is one line.
    r = _main(
        "--config=configs/300w_mobilefan_0.5.py",
        "--mode=eval",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={tmp_path / 'nowhere'}",
        HOME=str(home),
    )
    _assert_one_error_line(r.returncode, r.stderr, "dataset.data_dir", str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------------- 5. leftovers


def test_a_killed_build_is_cleaned_up_by_the_next(tree, tmp_path, capsys):
    data_dir = tmp_path / "tfds"
    stale = data_dir / "the300w" / "incomplete.ABC123_1.0.0"
    stale.mkdir(parents=True)
    (stale / "the300w-train.array_record-00000-of-00001").write_bytes(b"half a shard")
    assert (
        data.main(["300w", "--data_dir", str(data_dir), "--manual_dir", str(tree / "manual")]) == 0
    )
    assert not stale.exists()
    assert "left by an interrupted build" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["../escape.pts", "/abs/escape.pts"])
def test_archive_members_outside_the_tree_are_refused(tree, tmp_path, capsys, bad):
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / "300w.tar.gz", "w:gz") as t:
        t.add(tree / "manual", "300W")
        info = tarfile.TarInfo(bad)
        payload = b"version: 1\n"
        info.size = len(payload)
        import io

        t.addfile(info, io.BytesIO(payload))
    assert (
        data.main(["300w", "--data_dir", str(tmp_path / "tfds"), "--manual_dir", str(manual)]) == 1
    )
    _assert_one_error_line(1, capsys.readouterr().err, "300w.tar.gz", bad, "absolute or '..'")
