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
    # The photo path reads the same sidecar and fails the same way.
    from fan_jax import predict

    for path, needles in ((no_sidecar, [no_sidecar + ".json"]), (truncated, [truncated])):
        assert predict.main(["--model", path, str(tmp_path / "any.png")]) == 2
        _one_error(capsys, *needles)


# ------------------------------------------------------------------------- predict --model


def _face_photo(tmp_path):
    """A synthetic face (the model's training distribution) on a larger canvas, with its box."""
    import cv2

    from fan_jax import geometry, synthetic

    img, lm = synthetic.render_face(4321, size=160)
    path = str(tmp_path / "face.png")
    cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path, geometry.box_from_landmarks(lm)


def test_predict_from_an_exported_file_matches_the_workdir(run, exported, tmp_path, capsys):
    from fan_jax import predict

    workdir, _ = run
    photo, box = _face_photo(tmp_path)
    box_arg = ",".join(f"{v:.2f}" for v in box)
    got = {}
    for name, src in (("jax", ["--workdir", workdir]), ("file", ["--model", exported["none"]])):
        out = str(tmp_path / f"{name}.json")
        assert predict.main([*src, photo, "--box", box_arg, "-o", out]) == 0
        with open(out) as f:
            got[name] = np.asarray(json.load(f)["images"][0]["faces"][0]["landmarks"])
    capsys.readouterr()
    # In crop pixels (64 px crop of a 1.25 x box side window): the export's own tolerance,
    # at most one heatmap pixel (4 crop px) on a near tie, and most points identical.
    per_crop_px = 64 / (1.25 * max(box[2] - box[0], box[3] - box[1]))
    diff = np.abs(got["jax"] - got["file"]).max(axis=-1) * per_crop_px
    assert diff.max() <= 4.0 + 1e-3, np.sort(diff)[-5:]
    assert np.median(diff) < 0.05, np.median(diff)


def test_predict_and_video_from_an_exported_file_find_the_astronaut(
    run, exported, tmp_path, capsys
):
    import cv2
    from skimage import data as skdata

    from fan_jax import predict

    workdir, _ = run
    photo = str(tmp_path / "astronaut.png")
    cv2.imwrite(photo, cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    out = str(tmp_path / "faces.json")
    assert predict.main(["--model", exported["none"], photo, "-o", out]) == 0
    with open(out) as f:
        report = json.load(f)
    (face,) = report["images"][0]["faces"]
    x0, y0, x1, y1 = face["box"]
    assert 140 < (x0 + x1) / 2 < 260 and 50 < (y0 + y1) / 2 < 170  # the face, not the suit
    assert report["model"]["model_file"] == exported["none"]
    # A clip: the same detector, tracking and JSON lines as the workdir's JAX model.
    clip = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(clip, cv2.VideoWriter_fourcc(*"MJPG"), 10, (512, 512))
    for _ in range(6):
        writer.write(cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    writer.release()
    tracks = {}
    for name, src in (("jax", ["--workdir", workdir]), ("file", ["--model", exported["none"]])):
        lines = str(tmp_path / f"{name}.jsonl")
        assert predict.main([*src, clip, "-o", lines, "--min_score", "-1"]) == 0
        with open(lines) as f:
            tracks[name] = [json.loads(x) for x in f]
    capsys.readouterr()
    assert len(tracks["file"]) == len(tracks["jax"]) == 6
    # A face is output once its third detection round confirms it (frame 2).
    assert not any(r["faces"] for t in tracks.values() for r in t[:2])
    for a, b in zip(tracks["jax"][2:], tracks["file"][2:]):
        assert [f["id"] for f in a["faces"]] == [f["id"] for f in b["faces"]]
        assert any(140 < (f["box"][0] + f["box"][2]) / 2 < 260 for f in b["faces"])
        for fa, fb in zip(a["faces"], b["faces"]):
            assert np.abs(np.subtract(fa["box"], fb["box"])).max() < 8, (fa["box"], fb["box"])


def test_the_exported_path_imports_no_flax_orbax_or_training_module(exported, tmp_path):
    import subprocess
    import sys

    import cv2

    photo = str(tmp_path / "grey.png")
    cv2.imwrite(photo, np.full((96, 96, 3), 128, np.uint8))
    code = (
        "import runpy, sys\n"
        "sys.argv = ['fan_jax.predict', '--model', sys.argv[1], sys.argv[2], '--box', "
        "'10,10,80,80']\n"
        "try:\n    runpy.run_module('fan_jax.predict', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('EXIT', code)\n"
        "print('MODULES', ' '.join(sorted(sys.modules)))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, exported["none"], photo],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "EXIT 0" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    modules = r.stdout.split("MODULES ", 1)[1].split()
    heavy = {"flax", "orbax", "optax", "grain", "jax"}
    training = {
        "fan_jax.train",
        "fan_jax.checkpoints",
        "fan_jax.steps",
        "fan_jax.tasks",
        "fan_jax.input_pipeline",
        "fan_jax.data",
        "fan_jax.models",
    }
    loaded = {m for m in modules if m.split(".")[0] in heavy or m in training}
    assert not loaded, sorted(loaded)


def test_precision_guard_scores_both_precisions_on_every_test_split(run, capsys):
    """`benchmarks/precision_guard.py` (the bf16 accuracy guard) through its main: both NMEs
    per test split, their difference, and an exit status that follows the tolerance."""
    from benchmarks import precision_guard

    workdir, _ = run
    status = precision_guard.main(["--workdir", workdir])
    out = json.loads(capsys.readouterr().out)
    nme = out["nme_percent"]
    assert set(nme) == {"float32", "bfloat16"}
    assert set(nme["float32"]) == set(nme["bfloat16"]) == {"full", "common", "challenging"}
    for split, value in nme["bfloat16"].items():
        assert 0 < value < 100 and 0 < nme["float32"][split] < 100
        assert out["bf16_minus_f32_points"][split] == pytest.approx(value - nme["float32"][split])
    within = all(
        abs(d) <= precision_guard.TOLERANCE_POINTS for d in out["bf16_minus_f32_points"].values()
    )
    assert out["within"] == within and status == (0 if within else 1)


@pytest.mark.slow
def test_bf16_stays_within_the_guard_on_the_demo_model():
    """The guard on a trained model: the distilled MobileFAN of the demo run in
    $FAN_JAX_DEMO_WORKDIR (`python -m fan_jax.main --config=configs/demo.py`; CI has none)."""
    from benchmarks import precision_guard

    demo = os.environ.get("FAN_JAX_DEMO_WORKDIR")
    if not demo:
        pytest.skip("set FAN_JAX_DEMO_WORKDIR to a configs/demo.py workdir")
    assert precision_guard.main(["--workdir", os.path.join(demo, "mobilefan_kd")]) == 0
