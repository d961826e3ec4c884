"""fan_jax.export: every exported format, run in its own runtime, against the JAX model.

The model is the MobileFAN that test_predict.py trains briefly on synthetic faces (64x64
input, 68 landmarks): trained heatmaps have real peaks, so 'same landmarks' after
quantization means something. Each format is exported once per module through the CLI.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_predict import trained_student_workdir

from fan_jax import checkpoints, export, export_graph, heatmaps, landmarks, predict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.sections import export as export_bench

HM_STRIDE = 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return trained_student_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def student(workdir):
    return predict.load_student(workdir=workdir)


@pytest.fixture(scope="module")
def jax_fn(student):
    """The reference: the training layers as they are (depthwise convs as shifted slices)."""
    return jax.jit(export_graph.inference_fn(student.model, student.variables, native_convs=False))


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
    """{name: path}, each written by `python -m fan_jax.export` (in process), once per
    session: pytest-xdist workers share them through a lock, as they share the model."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "fan_jax_exported"
    specs = (
        ("onnx", "onnx", "none", "m.onnx"),
        ("tflite", "tflite", "none", "m.tflite"),
        ("tflite_float16", "tflite", "float16", "m16.tflite"),
        ("tflite_int8", "tflite", "int8", "m8.tflite"),
        ("savedmodel", "savedmodel", "none", "sm"),
    )
    with open(str(out) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done.json").exists():
            out.mkdir(exist_ok=True)
            printed = {}
            for name, fmt, quant, file in specs:
                args = ["--workdir", workdir, "--format", fmt, "--out", str(out / file)]
                if name != "tflite":  # the CLI's own check against JAX runs once
                    args.append("--no_verify")
                if quant != "none":
                    args += ["--quantize", quant, "--num_representative", "16"]
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    assert export.main(args) == 0
                printed[name + ":stdout"] = buf.getvalue()
            (out / "done.json").write_text(json.dumps(printed))
    paths = {name: str(out / file) for name, _, _, file in specs}
    paths.update(json.loads((out / "done.json").read_text()))
    return paths


def _random_images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def _faces(n, size, seed=100):
    return export.synthetic_crops(n, size, seed=seed).astype(np.float32)


def test_decode_landmarks_matches_heatmaps_decode():
    rng = np.random.default_rng(0)
    hm = rng.normal(size=(3, 16, 16, 7)).astype(np.float32)
    # Peaks on every edge and corner (no neighbour on one side), and exact ties.
    hm[0, 0, 5, 0] = hm[0, 15, 15, 1] = hm[1, 7, 0, 2] = hm[1, 0, 0, 3] = 9.0
    hm[2, 4, 4, 4] = 9.0
    hm[2, 4, 5, 4] = hm[2, 4, 3, 4] = 1.0
    hm[2, 3, 4, 4] = hm[2, 5, 4, 4] = 2.0
    want = heatmaps.from_heatmap_coords(heatmaps.decode(jnp.asarray(hm)), stride=4)
    got = jax.jit(export_graph.decode_landmarks)(hm)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("name,batch", [("tflite", 3), ("onnx", 3), ("savedmodel", 2)])
def test_float32_exports_match_jax(exported, jax_fn, student, name, batch):
    model = export.load_exported(exported[name])
    assert model.format == name and model.input_size == student.input_size
    for images in (_random_images(batch, student.input_size), _faces(batch, student.input_size)):
        got = model(images)
        hm, lm = (np.asarray(a) for a in jax_fn(images))
        assert got["heatmaps"].shape == hm.shape == (batch, 16, 16, 68)
        assert got["landmarks"].shape == lm.shape == (batch, 68, 2)
        np.testing.assert_allclose(got["heatmaps"], hm, rtol=0, atol=1e-4)
        assert np.abs(got["landmarks"] - lm).max() <= HM_STRIDE
    # The trained maps are not flat, so the 1e-4 bound is a real constraint.
    assert np.abs(hm).max() > 0.2


def test_exported_inputs_are_raw_rgb_pixels(exported, jax_fn, student):
    # Normalisation is inside the graph: the same uint8 crop, given as uint8 values in
    # float32, must match JAX fed the same values (not pre-normalised ones).
    crops = export.synthetic_crops(1, student.input_size, seed=9)
    got = export.load_exported(exported["onnx"])(crops)
    hm, _ = jax_fn(crops.astype(np.float32))
    np.testing.assert_allclose(got["heatmaps"], np.asarray(hm), atol=1e-4)
    hm_norm, _ = jax.jit(lambda x: student.model.apply(student.variables, x, train=False))(
        landmarks.normalize_np(crops)
    )
    np.testing.assert_allclose(got["heatmaps"], np.asarray(hm_norm), atol=1e-4)


def test_float16_tflite_gives_the_same_landmarks(exported, jax_fn, student):
    images = _faces(8, student.input_size, seed=200)
    got = export.load_exported(exported["tflite_float16"])(images)
    hm, lm = (np.asarray(a) for a in jax_fn(images))
    np.testing.assert_allclose(got["heatmaps"], hm, atol=1e-2)
    diff_hm_px = np.abs(got["landmarks"] - lm).max(axis=-1) / HM_STRIDE
    assert diff_hm_px.max() <= 1.0, diff_hm_px.max()
    ratio = export.file_size(exported["tflite_float16"]) / export.file_size(exported["tflite"])
    assert ratio < 0.6, ratio


def test_int8_tflite_gives_nearly_the_same_landmarks(exported, jax_fn, student):
    # Full int8 moves the heatmaps by ~0.2 at peaks of ~0.8 in this briefly trained model;
    # a point whose map has two near-equal modes can then jump. Most points stay put.
    images = _faces(8, student.input_size, seed=200)
    got = export.load_exported(exported["tflite_int8"])(images)
    _, lm = jax_fn(images)
    diff_hm_px = np.abs(got["landmarks"] - np.asarray(lm)).max(axis=-1) / HM_STRIDE
    assert np.mean(diff_hm_px <= 1.0 + 1 / 16) >= 0.97, np.sort(diff_hm_px.ravel())[-20:]
    assert np.median(diff_hm_px) <= 0.3
    # The in-graph decode stays integer until one final quantized add: its output agrees
    # with decoding the model's own (requantized) heatmaps to within that step for almost
    # every point, and within a quarter heatmap pixel (a tie broken differently) for all.
    own = heatmaps.from_heatmap_coords(heatmaps.decode(jnp.asarray(got["heatmaps"])), stride=4)
    diff_crop_px = np.abs(got["landmarks"] - np.asarray(own)).max(axis=-1)
    assert np.mean(diff_crop_px <= 0.3) >= 0.95
    assert diff_crop_px.max() <= 1.3
    ratio = export.file_size(exported["tflite_int8"]) / export.file_size(exported["tflite"])
    assert ratio < 0.35, ratio


def test_sidecar_describes_the_interface(exported, student):
    for name, path in exported.items():
        if name.endswith(":stdout"):
            continue
        with open(path.rstrip("/") + ".json") as f:
            info = json.load(f)
        assert info["num_landmarks"] == 68
        assert info["input"]["name"] == "image" and info["input"]["range"] == [0, 255]
        assert "mean" in info["input"]["normalization"]
        assert info["outputs"]["heatmaps"]["shape"][1:] == [16, 16, 68]
        assert info["source"]["model"] == "mobilefan" and info["source"]["step"] == 250
        assert info["quantize"] == {"tflite_float16": "float16", "tflite_int8": "int8"}.get(
            name, "none"
        )
        batch = info["input"]["shape"][0]
        assert batch == (1 if name.startswith("tflite") else "batch")


def test_onnx_has_named_symbolic_batch(exported):
    import onnx

    m = onnx.load(exported["onnx"])
    (inp,) = m.graph.input
    assert inp.name == "image"
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in m.graph.output] == ["heatmaps", "landmarks"]
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["fan_jax"])["num_landmarks"] == 68


def test_native_convs_match_the_training_layers(student):
    images = _random_images(2, student.input_size, seed=3)
    native = jax.jit(export_graph.inference_fn(student.model, student.variables, native_convs=True))
    plain = jax.jit(export_graph.inference_fn(student.model, student.variables, native_convs=False))
    np.testing.assert_allclose(
        np.asarray(native(images)[0]), np.asarray(plain(images)[0]), atol=1e-5
    )
    # ... and the exported graph really holds (grouped) convolutions, not slices and dots.
    hlo = native.lower(images).as_text()
    # MobileNetV2: 1 stem + 17 depthwise + 33 pointwise (16 expand, 17 project), + the 1x1
    # head; the three 2x2 stride-2 deconvolutions stay matmuls (exactly what they are).
    assert hlo.count("stablehlo.convolution") == 52
    assert hlo.count("stablehlo.dot_general") == 3
    assert "feature_group_count = 32" in hlo


def test_student_variables_drop_the_adapters():
    item = {
        "params": {"student": {"head": 1}, "adapters": {"adapter_0": 2}},
        "batch_stats": {"student": {"bn": 3}, "adapters": {"bn": 4}},
    }
    assert checkpoints.student_variables(item) == {"params": {"head": 1}, "batch_stats": {"bn": 3}}
    plain = {"params": {"head": 1}, "batch_stats": {"bn": 3}}
    assert checkpoints.student_variables(plain) == plain


def test_cli_errors(tmp_path, capsys, workdir):
    assert (
        export.main(
            [
                "--workdir",
                str(tmp_path / "none"),
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "m.onnx"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export.main(
            [
                "--workdir",
                workdir,
                "--format",
                "onnx",
                "--quantize",
                "int8",
                "--out",
                str(tmp_path / "m.onnx"),
            ]
        )
    assert e.value.code == 2
    assert "tflite only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.main(["--workdir", workdir, "--format", "coreml", "--out", "x"])
    assert not os.path.exists(tmp_path / "m.onnx")


def test_cli_verifies_against_jax(exported):
    lines = exported["tflite:stdout"].splitlines()
    assert any(ln.startswith("Wrote ") and "MiB" in ln for ln in lines)
    line = next(ln for ln in lines if ln.startswith("Check against JAX"))
    check = json.loads(line.split(":", 1)[1])
    assert check["max_abs_heatmap_diff"] < 1e-4 and check["max_landmark_diff_px"] == 0.0
    assert not any(
        "Check against JAX" in exported[k]
        for k in exported
        if k.endswith(":stdout") and k != "tflite:stdout"
    )


def test_detect_format(tmp_path):
    assert export.detect_format("a/b.tflite") == "tflite"
    assert export.detect_format("x.ONNX") == "onnx"
    (tmp_path / "saved_model.pb").write_bytes(b"")
    assert export.detect_format(str(tmp_path)) == "savedmodel"
    with pytest.raises(ValueError, match="cannot tell"):
        export.detect_format("model.pt")


def test_benchmark_exports_reports_latency_and_size(workdir):
    res = export_bench.benchmark_exports(workdir=workdir, formats=("tflite",), repeats=2, iters=2)
    assert res["image_size"] == 64 and res["num_landmarks"] == 68
    assert res["tflite"]["latency_ms"] > 0 and res["jax"]["latency_ms"] > 0
    assert res["tflite"]["size_mib"] > 1
    metric, ours, baseline, _speed, _spread = res["rows"][0]
    assert "tflite" in metric and float(ours) > 0 and float(baseline) > 0
    assert set(res["summary"]) >= {
        "export_tflite_latency_ms",
        "export_tflite_size_mib",
        "export_jax_latency_ms",
    }
