"""Exported files scored on their run's test splits, calibrated on its training split, and
refused with one named line when file, sidecar and workdir disagree (issue: exported models).

Everything goes through the CLIs' mains (`fan_jax.export`, `fan_jax.score_exported`), as the
README's commands do, on the session's briefly trained MobileFAN whose record points at a
synthetic 300W tree built by the real builder.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from test_predict import trained_student_workdir

from fan_jax import data, export, record, score_exported, synthetic_300w


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The session's briefly trained MobileFAN (test_predict: 64 px, real heatmap peaks),
    pointed at a synthetic 300W tree built by the real builder: (workdir, data_dir)."""
    root = tmp_path_factory.mktemp("scored")
    synthetic_300w.write_300w_tree(str(root / "manual"), num_train=12, num_test=6, size=160)
    data.prepare("300w", str(root / "tfds"), str(root / "manual"))
    workdir = str(root / "w")
    shutil.copytree(trained_student_workdir(tmp_path_factory), workdir)
    rec = record.read_record(workdir)
    rec["dataset"]["data_dir"] = str(root / "tfds")
    rec["dataset"]["manual_dir"] = str(root / "manual")
    record.write_record(rec, workdir)
    return workdir, str(root / "tfds")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """float32 and int8 TFLite files exported with --evaluate."""
    workdir, _ = run
    out = tmp_path_factory.mktemp("exports")
    paths = {}
    for quant in ("none", "int8"):
        path = str(out / f"m_{quant}.tflite")
        args = ["--workdir", workdir, "--which", "latest", "--format", "tflite", "--out", path]
        status = export.main([*args, "--quantize", quant, "--evaluate", "--no_verify"])
        assert status == 0
        paths[quant] = path
    return paths


def _sidecar(path):
    with open(path + ".json") as f:
        return json.load(f)


def test_export_evaluate_records_both_scores_and_the_float_file_matches_jax(exported, capsys):
    info = _sidecar(exported["none"])
    splits = set(info["evaluation"])
    assert splits == set(info["evaluation_reference"]) == {"full", "common", "challenging"}
    for s in splits:
        got, ref = info["evaluation"][s], info["evaluation_reference"][s]
        assert set(got) == {"nme", "fr", "auc", "count"} and got["count"] == ref["count"] > 0
        # A float32 file computes the checkpoint's landmarks: the same scores (to float
        # rounding of near-tied heatmap peaks), and a briefly trained model finds faces.
        assert abs(got["nme"] - ref["nme"]) < 2e-3, (s, got, ref)
        assert ref["nme"] < 0.3, (s, ref)
    assert "calibration" not in info
    assert os.path.exists(exported["none"] + ".eval/metrics.json")


def test_int8_calibrates_on_the_runs_training_split(exported):
    info = _sidecar(exported["int8"])
    assert info["calibration"] == {"source": "300w train", "split": "train", "count": 12}
    assert set(info["evaluation"]) == {"full", "common", "challenging"}
    assert all(np.isfinite(v["nme"]) for v in info["evaluation"].values())


def test_int8_falls_back_to_synthetic_faces_with_a_warning(run, tmp_path, capsys):
    workdir, _ = run
    moved = str(tmp_path / "w")
    shutil.copytree(workdir, moved)
    rec = record.read_record(moved)
    rec["dataset"]["data_dir"] = str(tmp_path / "gone")
    record.write_record(rec, moved)
    path = str(tmp_path / "m.tflite")
    args = ["--workdir", moved, "--which", "latest", "--format", "tflite", "--out", path]
    assert (
        export.main([*args, "--quantize", "int8", "--no_verify", "--num_representative", "8"]) == 0
    )
    assert "WARNING: int8 calibration" in capsys.readouterr().err
    assert _sidecar(path)["calibration"] == {"source": "synthetic", "split": None, "count": 8}
    assert not (tmp_path / "gone").exists()


def test_score_cli_gives_the_sidecars_numbers(run, exported, capsys):
    workdir, _ = run
    path = exported["none"]
    shutil.rmtree(path + ".eval")
    assert score_exported.main(["--model", path, "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    assert "m_none.tflite" in out
    with open(path + ".eval/metrics.json") as f:
        metrics = json.load(f)
    for s, v in _sidecar(path)["evaluation"].items():
        assert metrics[s]["no_flip"]["nme"] == pytest.approx(v["nme"], abs=1e-9)
        assert "flip" in metrics[s]


def _one_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("ERROR: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_files_sidecars_and_workdirs_are_one_named_line(run, exported, tmp_path, capsys):
    workdir, _ = run
    good = exported["none"]

    def copy(name, with_sidecar=True):
        dst = str(tmp_path / name)
        shutil.copy(good, dst)
        if with_sidecar:
            shutil.copy(good + ".json", dst + ".json")
        return dst

    cases = []
    no_sidecar = copy("a.tflite", with_sidecar=False)
    cases.append((no_sidecar, workdir, [no_sidecar + ".json", "missing"]))
    corrupt = copy("b.tflite")
    with open(corrupt + ".json", "w") as f:
        f.write("{not json")
    cases.append((corrupt, workdir, [corrupt + ".json", "not a fan_jax export sidecar"]))
    truncated = copy("c.tflite")
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(good) // 3)
    cases.append((truncated, workdir, [truncated, "cannot load it"]))
    size = copy("d.tflite")
    info = _sidecar(size)
    info["input"]["shape"][1] = 128
    with open(size + ".json", "w") as f:
        json.dump(info, f)
    cases.append((size, workdir, [size, "128"]))
    count = copy("e.tflite")
    info = _sidecar(count)
    info["num_landmarks"] = 98
    with open(count + ".json", "w") as f:
        json.dump(info, f)
    cases.append((count, workdir, [count, "98"]))
    foreign = str(tmp_path / "f.onnx")
    with open(foreign, "wb") as f:
        f.write(b"\x08\x07garbage" * 50)
    shutil.copy(good + ".json", foreign + ".json")
    cases.append((foreign, workdir, [foreign, "cannot load it"]))
    unknown = str(tmp_path / "g.xyz")
    shutil.copy(good, unknown)
    shutil.copy(good + ".json", unknown + ".json")
    cases.append((unknown, workdir, [unknown, "cannot tell the format"]))
    other = str(tmp_path / "w98")
    shutil.copytree(workdir, other)
    rec = record.read_record(other)
    rec["dataset"]["name"] = "wflw"
    record.write_record(rec, other)
    cases.append((good, other, [good, "wflw has 98"]))
    for path, wd, needles in cases:
        assert score_exported.main(["--model", path, "--workdir", wd]) == 2, path
        _one_error(capsys, *needles)
