"""The real-time CPU path: bf16 matmuls (`use_dot_dtype`, `--precision`), the `auto` choice
and its cache, the benchmark's e2e and video sections in --quick mode, and a crop box held on
the detection. Timings are reported by benchmarks/run.py, never asserted here."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data as skdata

from fan_jax import precision, predict
from fan_jax.models.layers import ConvTranspose, PointwiseConv, use_dot_dtype

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers


@pytest.mark.parametrize("layer", [PointwiseConv(16), ConvTranspose(8, kernel_size=2, strides=2)])
def test_bf16_dots_round_only_the_matmul_inputs(layer):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
    v = layer.init(jax.random.key(1), x)
    f32 = layer.apply(v, x)
    with use_dot_dtype("bfloat16"):
        jaxpr = str(jax.make_jaxpr(layer.apply)(v, x))
        bf16 = layer.apply(v, x)
    assert "bf16" in jaxpr and bf16.dtype == jnp.float32
    # Reference: the same matmul on inputs rounded to bf16, summed in float64.
    xr = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    kr = np.asarray(v["params"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    if isinstance(layer, PointwiseConv):
        ref = xr.reshape(-1, 32) @ kr.reshape(32, 16)
        np.testing.assert_allclose(np.asarray(bf16).reshape(-1, 16), ref, rtol=1e-4, atol=1e-4)
    err = float(jnp.max(jnp.abs(bf16 - f32)) / jnp.max(jnp.abs(f32)))
    assert 0 < err < 2e-2  # bf16 rounding, not float32 exactness, and not garbage


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return helpers.tiny_student_workdir(str(tmp_path_factory.mktemp("rt_student")))


def test_cli_precision_bfloat16_stays_near_float32_on_a_real_photo(workdir, tmp_path):
    import cv2

    img = tmp_path / "astronaut.png"
    cv2.imwrite(str(img), cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    faces = {}
    for p in ("float32", "bfloat16"):
        out = tmp_path / f"{p}.json"
        argv = ["--workdir", workdir, "--which", "latest", str(img), "-o", str(out)]
        assert predict.main([*argv, "--box", "150,60,330,260", "--precision", p]) == 0
        rec = json.loads(out.read_text())
        assert rec["model"]["precision"] == p
        faces[p] = np.asarray(rec["images"][0]["faces"][0]["landmarks"])
    # The 2-step model's heatmaps are nearly flat, so a peak may move a heatmap pixel or two.
    assert np.median(np.abs(faces["float32"] - faces["bfloat16"])) < 8.0


def test_auto_precision_is_float32_without_bf16_units_and_measured_once_with_them(
    workdir, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    p = predict.Predictor.from_workdir(
        workdir, which="latest", detector=lambda im: np.zeros((0, 4))
    )
    measured = []
    real_measure = precision.measure
    monkeypatch.setattr(precision, "measure", lambda pr: measured.append(1) or real_measure(pr))
    monkeypatch.setattr(precision, "cpu_model_and_flags", lambda: ("Test CPU", {"avx2"}))
    assert p.set_precision("auto") == "float32" and not measured
    assert "no bf16 matmul units" in p.info["precision_auto"]
    monkeypatch.setattr(precision, "cpu_model_and_flags", lambda: ("Test CPU", {"amx_bf16"}))
    first = p.set_precision("auto")
    assert measured == [1] and first in ("float32", "bfloat16")
    cache = json.loads((tmp_path / "fan_jax" / "precision.json").read_text())
    (entry,) = cache.values()
    assert entry["pick"] == first and set(entry["ms"]) == {"float32", "bfloat16"}
    assert p.set_precision("auto") == first and measured == [1]  # from the cache
    crops = np.zeros((1, p.input_size, p.input_size, 3), np.uint8)
    assert p.predict_crops(crops)[0].shape == (1, p.num_landmarks, 2)
    with pytest.raises(ValueError, match="precision must be"):
        p.set_precision("fp8")


def test_quick_e2e_and_video_sections(tmp_path):
    pytest.importorskip("dlib")
    from benchmarks import run as bench

    report = bench.main(["--quick", "--sections", "e2e,video", "--json", str(tmp_path / "r.json")])
    e2e = report["sections"]["e2e"]
    assert report["e2e_latency_ms"] > 0 and e2e["network_ms"] > 0
    assert set(report["e2e_peer_latency_ms"]) >= {"torch_eager_float32"} or "torch" in e2e["notes"]
    # The exported peers run the same weights: the same landmarks, in image pixels.
    for name, px in e2e["median_px_vs_fan_jax"].items():
        assert px < 0.5, (name, px)
    vid = report["sections"]["video"]
    assert vid["async"]["frames"] == vid["sync"]["frames"] == 40
    assert vid["sync"]["track_ids"] == [0] and vid["sync"]["tracked_frames_per_s"] > 0
    assert vid["sync"]["first_face_frame"] == 2  # confirmed by its third round
    assert report["video_frames_per_s"] >= 0  # 0 when the async rounds lag a 40-frame clip
    assert {"read", "detect", "crop", "network", "smooth", "draw", "write"} <= set(
        vid["async"]["stage_ms"]
    )


def test_bf16_leaves_the_patch_stem_float32():
    """The stem's patch gather is slower in bf16 than its matmul gains (`patch_conv`)."""
    from fan_jax.models.layers import PatchConv

    layer = PatchConv(8, 3, strides=2)
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 3))
    v = layer.init(jax.random.key(1), x)
    with use_dot_dtype("bfloat16"):
        jaxpr = str(jax.make_jaxpr(layer.apply)(v, x))
        bf16 = layer.apply(v, x)
    assert "bf16" not in jaxpr
    np.testing.assert_array_equal(np.asarray(bf16), np.asarray(layer.apply(v, x)))


def test_unrolled_dots_match_the_matmul_and_apply_only_inside_their_context():
    from fan_jax.models.layers import PatchConv, unrolled_max_k, use_conv_impl, use_unrolled_dots

    assert unrolled_max_k() == 0  # training traces the matmul forms
    rng = np.random.default_rng(0)
    for layer, shape in [
        (PointwiseConv(24), (2, 8, 8, 16)),
        (PatchConv(8, 3, strides=2), (1, 16, 14, 3)),
        (PatchConv(8, 3, strides=1), (1, 9, 9, 3)),
    ]:
        x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
        v = layer.init(jax.random.key(1), x)
        with use_unrolled_dots(16):
            jaxpr = str(jax.make_jaxpr(layer.apply)(v, x))
            got = np.asarray(layer.apply(v, x), np.float64)
        assert "dot_general" not in jaxpr and "concatenate" not in jaxpr
        # Reference: the layer's own lax.conv_general_dilated form.
        with use_conv_impl("lax"):
            want = layer.apply(v, x)
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
    # More input channels than the limit keep the matmul.
    layer = PointwiseConv(8)
    x = jnp.ones((1, 4, 4, 32))
    v = layer.init(jax.random.key(0), x)
    with use_unrolled_dots(16):
        assert "dot_general" in str(jax.make_jaxpr(layer.apply)(v, x))


def test_inference_forms_keep_the_networks_heatmaps():
    """The Predictor's program (bf16 matmuls off, unrolled few-channel matmuls on) gives the
    training forms' heatmaps on a real photo."""
    from fan_jax import landmarks
    from fan_jax.models import fan
    from fan_jax.models.layers import inference_forms

    model = fan.mobilefan(98)
    crop = np.asarray(skdata.astronaut()[:256, 128:384])[None]
    x = landmarks.normalize(crop)
    v = model.init(jax.random.key(0), x, train=False)
    plain = np.asarray(model.apply(v, x, train=False)[0])
    with inference_forms("float32"):
        forms = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(v, x))
    assert np.abs(forms - plain).max() <= 1e-4 * np.abs(plain).max()
