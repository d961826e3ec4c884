"""Smoke tests of benchmarks/run.py (helpers, --quick mode) and the PyTorch twin. No timing asserts."""

from __future__ import annotations

import collections
import itertools
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import (
    harness,
    jax_runners,
    torch_runners,
    xla_flags,
)
from benchmarks import run as bench
from benchmarks.sections import (
    accelerator,
    export,
)

# ---------------------------------------------------------------------------------- helpers


def test_time_interleaved_alternates_and_warms_up():
    calls = []
    ticks = itertools.count()
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = harness.time_interleaved(fns, repeats=3, warmup=2, clock=lambda: float(next(ticks)))
    assert calls == ["a", "b"] * 2 + ["a", "b"] * 3
    assert times == {"a": [1.0] * 3, "b": [1.0] * 3}


def test_time_interleaved_repeats_per_fn_drops_out_early():
    calls = []
    fns = {"slow": lambda: calls.append("slow"), "fast": lambda: calls.append("fast")}
    times = harness.time_interleaved(fns, repeats=3, warmup=0, repeats_per_fn={"slow": 1})
    assert calls == ["slow", "fast", "fast", "fast"]
    assert len(times["slow"]) == 1 and len(times["fast"]) == 3


def test_summarize():
    s = harness.summarize([2.0, 1.0, 4.0], work=8)
    assert s["median_s"] == 2.0 and s["min_s"] == 1.0 and s["max_s"] == 4.0
    assert s["spread"] == pytest.approx(1.5)
    assert s["per_s"] == pytest.approx(4.0)
    assert s["repeats"] == 3
    with pytest.raises(ValueError):
        harness.summarize([])


def test_ratio_handles_missing():
    assert harness.ratio(6.0, 3.0) == 2.0
    assert harness.ratio(None, 3.0) is None
    assert harness.ratio(1.0, None) is None


def test_format_table_aligns_columns():
    table = bench.format_table(
        [("x", "1", "2", "0.5x", "1% / 2%"), ("longer metric", "10", "-", "-", "")]
    )
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("metric") and set(lines[1]) <= {"-", " "}
    # Every column starts at the same offset on every row.
    assert lines[2].index("1") == lines[3].index("10") == lines[0].index("ours")


def test_registry_hoists_summary_and_drops_rows(monkeypatch):
    monkeypatch.setattr(harness, "SECTIONS", {})

    @harness.section("dummy")
    def dummy(cfg):
        """A test section."""
        return {
            "value": cfg.repeats,
            "summary": {"dummy_speedup": 2.0},
            "rows": [("m", "1", "2", "3", "")],
        }

    @harness.section("off", default=False)
    def off(cfg):
        raise AssertionError("non-default sections must not run unless named")

    with pytest.raises(ValueError, match="twice"):
        harness.section("dummy")(dummy)
    report, rows = bench.run_sections(harness.Config(repeats=7), log=lambda s: None)
    assert report["dummy_speedup"] == 2.0
    assert report["sections"]["dummy"]["value"] == 7
    assert (
        "rows" not in report["sections"]["dummy"] and "summary" not in report["sections"]["dummy"]
    )
    assert rows == [("m", "1", "2", "3", "")]
    json.dumps(report)
    with pytest.raises(ValueError, match="unknown sections"):
        bench.run_sections(harness.Config(), ["nope"], log=lambda s: None)


def test_latency_sections_run_before_the_training_ones(monkeypatch):
    monkeypatch.setattr(harness, "SECTIONS", {})
    ran = []
    for name in ("machine", "train", "inference", "distill", "export"):
        harness.section(name)(lambda cfg, name=name: ran.append(name) or {})
    bench.run_sections(harness.Config(), log=lambda s: None)
    assert ran == ["machine", "inference", "export", "train", "distill"]
    ran.clear()
    bench.run_sections(harness.Config(), ["distill", "train"], log=lambda s: None)
    assert ran == ["distill", "train"]  # the rest keep the order asked for


def test_parse_args_defaults():
    args = bench.parse_args(["--quick", "--repeats", "3", "--sections", "train,fs_loss"])
    assert args.quick and args.repeats == 3 and args.sections == "train,fs_loss"
    assert set(harness.SECTIONS) >= {"machine", "train", "inference", "fs_loss", "accelerator"}


# ---------------------------------------------------------------------------------- --quick runs


def test_quick_fs_loss_section(tmp_path):
    path = tmp_path / "bench.json"
    report = bench.main(["--quick", "--sections", "fs_loss", "--json", str(path)])
    on_disk = json.loads(path.read_text())
    assert on_disk["fs_gram_speedup"] == pytest.approx(report["fs_gram_speedup"])
    assert on_disk["machine"]["cpu_count"] >= 1 and on_disk["machine"]["backend"]
    fs = on_disk["sections"]["fs_loss"]
    # Both forms compute the same loss: the benchmark must time equivalent work.
    assert fs["value_rel_diff"] < 1e-4
    assert fs["direct"]["temp_bytes"] is not None and fs["gram"]["temp_bytes"] is not None
    assert fs["direct"]["median_s"] > 0 and fs["gram"]["median_s"] > 0


def test_quick_inference_with_and_without_torch(monkeypatch, tmp_path):
    with monkeypatch.context() as m:
        m.setattr(harness, "load_torch", lambda: None)
        report = bench.main(
            ["--quick", "--sections", "inference", "--json", str(tmp_path / "a.json")]
        )
    assert report["inference_speedup_vs_torch"] is None
    section = report["sections"]["inference"]
    assert "skipped" in section["torch"]
    assert section["fan_jax"]["latency_ms"] > 0
    pytest.importorskip("torch")
    # The jitted forward is cached, so this second run costs no compile.
    report = bench.main(["--quick", "--sections", "inference", "--json", str(tmp_path / "b.json")])
    assert report["inference_speedup_vs_torch"] > 0
    section = report["sections"]["inference"]
    assert section["torch"]["latency_ms"] > 0 and section["torch_threads"] >= 1


@pytest.mark.slow  # compiling the MobileFAN train step takes minutes on a small shared CPU
def test_quick_train_with_torch(tmp_path):
    pytest.importorskip("torch")
    report = bench.main(["--quick", "--sections", "train", "--json", str(tmp_path / "b.json")])
    assert report["train_speedup_vs_torch"] > 0
    train = report["sections"]["train"]
    assert np.isfinite(train["fan_jax"]["final_loss"]) and np.isfinite(train["torch"]["final_loss"])
    assert train["torch_memory_format"] in ("contiguous", "channels_last")


def test_init_variables_are_finite_and_bn_is_identity():
    import jax

    variables = jax_runners.init_variables(98, 64)
    shapes = jax_runners.variable_shapes(98, 64)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(shapes)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        leaf = np.asarray(leaf)
        assert np.all(np.isfinite(leaf)), path
        name = path[-1].key
        if name in ("scale", "var"):
            assert np.all(leaf == 1), path
        elif name == "kernel":
            assert leaf.std() > 0, path


def test_accelerator_section_skipped_on_cpu():
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("an accelerator is present")
    assert "skipped" in accelerator.accelerator_section(harness.Config.quick_config())


# ---------------------------------------------------------------------------------- PyTorch twin


def _jax_param_count(num_landmarks: int) -> int:
    import jax

    shapes = jax_runners.variable_shapes(num_landmarks, 64)["params"]
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def test_torch_twin_has_the_same_parameter_count():
    pytest.importorskip("torch")
    from benchmarks.torch_mobilefan import TorchMobileFAN, count_parameters

    theirs = count_parameters(TorchMobileFAN(98))
    assert theirs == _jax_param_count(98)
    # REFERENCE.md section 1: about 2.0-2.1M for 98 landmarks.
    assert 1.9e6 < theirs < 2.2e6


def test_torch_twin_shapes():
    torch = pytest.importorskip("torch")
    from benchmarks.torch_mobilefan import TorchMobileFAN

    with torch.inference_mode():
        heatmaps, taps = TorchMobileFAN(29).eval()(torch.zeros(1, 3, 64, 64))
    assert tuple(heatmaps.shape) == (1, 29, 16, 16)
    assert [tuple(t.shape) for t in taps] == [(1, 128, 4, 4), (1, 128, 8, 8), (1, 128, 16, 16)]


def test_torch_runners_cover_every_thread_setting_in_one_format():
    made = []

    class Fake:
        def __init__(self, fmt, t):
            made.append((fmt, t))

        def run(self, units):
            pass

    cfg = harness.Config(torch_threads=None, torch_format="auto")
    runners, info = torch_runners.torch_runners(cfg, Fake, 1)
    cands = torch_runners.torch_thread_candidates(cfg)
    assert set(runners) == set(cands) and 1 in cands
    assert info["torch_memory_format"] in ("contiguous", "channels_last")
    assert set(info["torch_format_probe_s"]) == {"contiguous", "channels_last"}
    assert all(f == info["torch_memory_format"] for f, _ in made[-len(cands) :])
    assert torch_runners.torch_thread_candidates(harness.Config(torch_threads=4)) == (4,)
    assert (
        torch_runners.best_torch({1: {"per_s": 5.0}, 2: {"per_s": 7.0}}, lambda s: s["per_s"]) == 2
    )


def test_quick_inference_reports_torch_at_both_thread_settings():
    pytest.importorskip("torch")
    cfg = harness.Config.quick_config(torch_threads=None)
    report, _rows = bench.run_sections(cfg, ["machine", "inference"], log=lambda s: None)
    sec = report["sections"]["inference"]
    by = sec["torch_by_threads"]
    assert set(by) == {str(t) for t in torch_runners.torch_thread_candidates(cfg)}
    # The setting reported is one that was timed, and the faster of them.
    assert sec["torch"] == by[str(sec["torch_threads"])]
    assert sec["torch"]["latency_ms"] == min(s["latency_ms"] for s in by.values())
    assert all(s["repeats"] == cfg.repeats for s in by.values())
    # Fractions of the matmul peak measured by the machine section.
    assert report["machine"]["matmul_peak_xla"]["flops_per_s"] > 0
    assert 0 < sec["fan_jax"]["fraction_of_matmul_peak"] < 1.5
    assert report["inference_fraction_of_matmul_peak"] > 0


def _check_accelerator_report(report, dtypes):
    accel = report["sections"]["accelerator"]
    assert set(accel["train"]) == set(dtypes) == set(accel["matmul_peak"])
    for d in dtypes:
        assert set(accel["train"][d]) == {"2"} and set(accel["inference"][d]) == {"1"}
        assert all(
            s["per_s"] > 0 and np.isfinite(s.get("final_loss", 0.0))
            for s in [*accel["train"][d].values(), *accel["inference"][d].values()]
        )
        assert accel["distill"][d]["per_s"] > 0 and np.isfinite(accel["distill"][d]["final_loss"])
        assert accel["matmul_peak"][d]["flops_per_s"] > 0
    assert set(accel["layer_forms"]) and all(
        r["faster"] in ("matmul", "lax") for r in accel["layer_forms"].values()
    )
    assert accel["train_step_forms"]["faster"] in ("matmul", "lax")
    assert report["accelerator_faster_conv_form"] == accel["train_step_forms"]["faster"]
    return accel


def test_quick_accelerator_section_on_cpu(monkeypatch, tmp_path):
    """The accelerator section, named, runs on the CPU in --quick mode, float32 only: the bf16
    steps are CI-tested in test_mixed_precision, and each bf16 compile costs ~30 s here."""
    quick = harness.Config.quick_config
    monkeypatch.setattr(
        harness.Config,
        "quick_config",
        classmethod(lambda cls, **o: quick(**{"accel_dtypes": ("float32",), **o})),
    )
    report = bench.main(
        ["--quick", "--sections", "accelerator", "--json", str(tmp_path / "a.json")]
    )
    _check_accelerator_report(report, ("float32",))
    assert "accelerator_train_images_per_s_float32" in report


@pytest.mark.slow
def test_quick_accelerator_section_on_cpu_both_dtypes(tmp_path):
    """As CI's, in both dtypes: bf16 and float32 train the same first steps to nearby losses."""
    report = bench.main(
        ["--quick", "--sections", "accelerator", "--json", str(tmp_path / "a.json")]
    )
    accel = _check_accelerator_report(report, ("float32", "bfloat16"))
    np.testing.assert_allclose(
        accel["train"]["bfloat16"]["2"]["final_loss"],
        accel["train"]["float32"]["2"]["final_loss"],
        rtol=0.1,
    )
    assert "accelerator_train_images_per_s_bf16" in report


def test_torch_targets_match_fan_jax_targets():
    torch = pytest.importorskip("torch")
    from benchmarks.torch_mobilefan import render_gaussians as torch_render
    from fan_jax.heatmaps import render_gaussians, to_heatmap_coords

    _, landmarks = jax_runners.random_batch(2, 64, 5, seed=1)
    ours = np.asarray(render_gaussians(to_heatmap_coords(landmarks), size=16, sigma=1.0))
    # The torch trainer maps crop -> heatmap coords inline with the same formula.
    theirs = (
        torch_render((torch.from_numpy(landmarks) + 0.5) / 4 - 0.5, 16, 1.0)
        .permute(0, 2, 3, 1)
        .numpy()
    )
    np.testing.assert_allclose(theirs, ours, atol=1e-6)


# ---------------------------------------------------------------------------------- new sections


def test_quick_pipeline_section(monkeypatch):
    # Consumers measured by other sections of the same run; absent ones read "n/a".
    monkeypatch.setattr(
        harness,
        "CONSUMERS",
        {
            "train": {
                "images_per_s": 4.0,
                "batch": 2,
                "image_size": 64,
                "step": "CPU student train step",
            }
        },
    )
    report, rows = bench.run_sections(
        harness.Config.quick_config(), ["machine", "pipeline"], log=lambda s: None
    )
    section = report["sections"]["pipeline"]
    assert set(section["workers"]) == {"0", "1"}
    for s in section["workers"].values():
        assert s["images_per_s"] > 0 and s["ms_core_per_image"] > 0 and s["cores_used"] >= 1
    assert (
        report["pipeline_images_per_s_in_process"] > 0
        and report["pipeline_images_per_s_1_worker"] > 0
    )
    assert section["num_landmarks"] == 68 and section["image_size"] == 64
    assert section["consumers"]["train"]["pipeline_cores_needed"] > 0
    assert section["consumers"]["distill"].startswith("n/a")
    assert any("cores to feed" in r[0] for r in rows) and all(len(r) == 5 for r in rows)
    json.dumps(report)


def test_quick_distill_section():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _train_helpers as helpers

    helpers.register_tiny_models()  # MobileFAN + a ResNet teacher compile for minutes on a small CPU
    cfg = harness.Config.quick_config(
        distill_student="tiny_student", distill_teacher="tiny_teacher"
    )
    report, rows = bench.run_sections(cfg, ["machine", "distill"], log=lambda s: None)
    section = report["sections"]["distill"]
    for name in ("plain", "distill_gram", "distill_direct"):
        assert section[name]["per_s"] > 0 and np.isfinite(section[name]["final_loss"]), name
        assert section[name]["temp_bytes"] is not None
    # Same weights and batch: both FS forms give the same loss.
    assert section["loss_rel_diff_gram_vs_direct"] < 1e-4
    assert report["distill_images_per_s"] > 0 and report["distill_gram_speedup_vs_direct"] > 0
    assert harness.CONSUMERS["distill"]["images_per_s"] == report["distill_images_per_s"]
    rows = [r for r in rows if "matmul GFLOP/s" not in r[0]]  # the machine section's row
    assert len(rows) == 3 and all(len(r) == 5 for r in rows)
    json.dumps(report)


def test_quick_export_section():
    report, rows = bench.run_sections(
        harness.Config.quick_config(), ["machine", "export"], log=lambda s: None
    )
    section = report["sections"]["export"]
    if "skipped" in section:
        pytest.skip(section["skipped"])
    assert section["image_size"] == 64 and section["jax"]["latency_ms"] > 0
    for name in ("tflite", "onnx"):
        assert section[name]["latency_ms"] > 0 and section[name]["size_mib"] > 0
        assert section[name]["speedup_vs_jax"] > 0
    rows = [r for r in rows if "matmul GFLOP/s" not in r[0]]  # the machine section's row
    assert len(rows) == 2 and rows[0][0].startswith("export tflite")
    json.dumps(report)


def test_export_section_notes_missing_dependencies(monkeypatch):
    monkeypatch.setattr(
        export, "_missing_export_modules", lambda formats: {f: ["onnxruntime"] for f in formats}
    )
    out = export.export_section(harness.Config.quick_config())
    assert "skipped" in out and "onnxruntime" in out["formats"]["onnx"]


def test_layer_units_follow_the_student_and_count_its_flops():
    """The layers section's units are the student's own convolutions (each with its BN), and
    their shape-counted FLOPs agree with XLA's count of the same unit as a plain lax conv (which
    skips the taps that fall on padding: a few % at 64 px)."""
    import jax
    import jax.numpy as jnp

    from benchmarks.sections import layers as layer_section
    from fan_jax.models import layers

    units = layer_section.student_units(
        jax_runners.build_student(5), jax_runners.init_variables(5, 64), (1, 64, 64, 3)
    )
    kinds = [u.kind for u in units]
    # MobileNetV2 to block_16: stem, 16 expand + 17 depthwise + 17 project; 3 deconvs; the head.
    assert len(units) == 1 + 16 + 17 + 17 + 3 + 1
    assert kinds.count("DepthwiseConv") == 17 and kinds.count("ConvTranspose") == 3
    assert (
        units[0].name == "Conv1"
        and units[0].kind == "PatchConv"
        and units[0].in_shape == (64, 64, 3)
    )
    assert (
        units[-1].kind == "PointwiseConv"
        and units[-1].out_shape[-1] == 5
        and len(units[-1].modules) == 1
    )
    assert all(len(u.modules) == 2 for u in units[:-1])  # conv + BatchNorm everywhere but the head
    for u in (units[0], units[1], units[2], units[5]):  # stem, depthwise s1, project, depthwise s2
        conv = u.modules[0]
        x = jnp.zeros((1, *u.in_shape), jnp.float32)
        with layers.use_conv_impl("lax"):
            exe = (
                jax.jit(lambda v, x, conv=conv: conv.apply(v, x)).lower(u.variables[0], x).compile()
            )
        assert jax_runners.flops_of(exe) == pytest.approx(u.conv_flops_per_image, rel=0.05), u.name


def test_quick_layers_section(tmp_path):
    """The layers come from one profile of the whole program: every unit gets time, and the
    units plus what no unit claims are exactly the profiled ops."""
    report = bench.main(["--quick", "--sections", "layers", "--json", str(tmp_path / "l.json")])
    sec = report["sections"]["layers"]
    assert all(r["bytes_per_s"] > 0 for r in sec["streaming_rates"])
    modes = [m for m in ("inference", "inference_bf16", "train") if m in sec]
    assert modes[0] == "inference" and modes[-1] == "train"
    for mode in modes:
        m = sec[mode]
        assert {r["kind"] for r in m["layers"]} == {
            "PatchConv",
            "PointwiseConv",
            "DepthwiseConv",
            "ConvTranspose",
        }
        # Every unit of the network shows up in the profile (a unit no op maps to gets 1e-6).
        assert m["num_layers"] == len(m["layers"]) == 55
        for r in m["layers"]:
            assert r["ms"] > 1e-4, r["layer"]
            assert r["compute_bound_ms"] > 0 and r["memory_bound_ms"] > 0
            assert r["fraction_of_bound"] == pytest.approx(
                max(r["compute_bound_ms"], r["memory_bound_ms"]) / r["ms"]
            )
        assert m["total"]["ms"] == pytest.approx(sum(r["ms"] for r in m["layers"]))
        assert m["total"]["ms"] + m["outside_units_ms"] == pytest.approx(m["ops_sum_ms"], rel=1e-6)
        assert m["program_wall_ms"] > 0
        # The op times are the trace's shares scaled to the wall time (wall / traced program).
        assert 0.3 < m["traced_program_ms"] / m["program_wall_ms"] < 3, mode
        assert m["ops_ms_over_program_wall"] == pytest.approx(1.0, rel=0.1), mode
    # The forward's units claim most of its time: what is outside is input handling and the
    # decode.
    inf = sec["inference"]
    assert inf["outside_units_ms"] < 0.5 * inf["total"]["ms"]
    # Training moves more bytes and does 2-3x the FLOPs of inference, per image.
    i1, t1 = sec["inference"]["layers"][1], sec["train"]["layers"][1]
    assert t1["flops"] / t1["in_shape"][0] == pytest.approx(
        3 * i1["flops"] / i1["in_shape"][0], rel=0.05
    )
    assert report["layers_inference_fraction_of_bound"] > 0


def test_op_profile_attributes_ops_to_the_deepest_named_module():
    from benchmarks import op_profile

    hlo = """
  %ynn_fusion.3 = f32[16384,96]{1,0} fusion(%a), kind=kCustom, metadata={op_name="jit(net)/FAN/encoder/encoder._inverted_residual/block_1_expand/dot_general" stack_frame_id=75}
  %clamp_pad_fusion.1 = f32[1,130,130,96]{3,2,1,0} fusion(%b), kind=kLoop, metadata={op_name="jit(net)/FAN/encoder/encoder._inverted_residual/block_1_depthwise/jit(_pad)/pad"}
  ROOT %add.2 = f32[4]{0} add(%c, %d), metadata={op_name="jit(net)/FAN/encoder/block_1_expand_BN/add"}
  %copy.1 = f32[4]{0} copy(%e)
"""
    names = op_profile.op_names(hlo)
    assert names["ynn_fusion.3"].endswith("block_1_expand/dot_general")
    assert names["add.2"].endswith("block_1_expand_BN/add") and "copy.1" not in names
    units = [("expand", {"block_1_expand", "block_1_expand_BN"}), ("dw", {"block_1_depthwise"})]
    ops = {"ynn_fusion.3": 2.0, "clamp_pad_fusion.1": 1.0, "add.2": 0.5, "copy.1": 0.25}
    per_unit, other = op_profile.attribute(ops, names, units)
    assert per_unit == {"expand": 2.5, "dw": 1.0} and other == {"copy.1": 0.25}
    # A loop named for the depthwise's padding that computes the expand's taps: the expand's.
    fused = """
%fused_computation.7 (param_0: f32[4]) -> f32[6] {
  %mul.1 = f32[4]{0} multiply(%param_0, %param_0), metadata={op_name="jit(net)/FAN/block_1_expand/mul"}
  %add.1 = f32[4]{0} add(%mul.1, %mul.1), metadata={op_name="jit(net)/FAN/block_1_expand/add"}
  ROOT %pad.1 = f32[6]{0} pad(%add.1), metadata={op_name="jit(net)/FAN/block_1_depthwise/jit(_pad)/pad"}
}

ENTRY %main (a: f32[4]) -> f32[6] {
  ROOT %add_pad_fusion = f32[6]{0} fusion(%a), kind=kLoop, calls=%fused_computation.7, metadata={op_name="jit(net)/FAN/block_1_depthwise/jit(_pad)/pad"}
}
"""
    names = op_profile.fused_op_names(fused)
    assert names["add_pad_fusion"][0].endswith("block_1_expand/mul")
    assert len(names["add_pad_fusion"]) == 3
    assert op_profile.attribute({"add_pad_fusion": 1.0}, names, units)[0] == {"expand": 1.0}
    assert op_profile.attribute({"add_pad_fusion": 1.0}, op_profile.op_names(fused), units)[0] == {
        "dw": 1.0
    }


def test_op_profile_cli_profiles_the_predictors_program(capsys):
    from benchmarks import op_profile

    args = ["--precision", "float32,bfloat16", "--image_size", "64", "--top", "1000"]
    report = op_profile.main([*args, "--calls", "2", "--rounds", "1"])
    assert set(report) == {"float32", "bfloat16"}
    for prec, r in report.items():
        assert r["wall_ms"] > 0 and r["sum_of_ops_ms"] > 0, prec
        # The predictor's program ends in the decode (the maps' maxima), outside the model.
        decode = [o for o in r["top_ops"] if "FAN/" not in o["op_name"]]
        assert any("reduce_max" in o["op_name"] for o in decode), (prec, decode)
        assert sum(r["by_kind_ms"].values()) == pytest.approx(r["sum_of_ops_ms"])
    assert "bfloat16: wall" in capsys.readouterr().out


def test_wall_shares_split_overlapping_ops_and_add_up_to_busy_time():
    from benchmarks import op_profile

    # Thread a: x [0, 10) with `inner` nested at [2, 4), then z [20, 30); thread b: y [5, 15).
    events = [(0, 10, "a", "x"), (5, 15, "b", "y"), (2, 4, "a", "inner"), (20, 30, "a", "z")]
    events.append((7, 7, "a", "instant"))  # takes no time, and must not hold the thread after
    shares = op_profile.wall_shares(events)
    assert shares == pytest.approx({"x": 2 + 1 + 2.5, "inner": 2.0, "y": 2.5 + 5, "z": 10.0})
    # Durations would sum to 42; the shares add up to the 25 in which something ran.
    assert sum(shares.values()) == pytest.approx(25.0)
    # A brute-force reference on a random trace: 1/k per unit step among running threads.
    rng = np.random.default_rng(0)
    events, ref = [], collections.Counter()
    for thread in "abc":
        t = 0
        for i in range(20):
            start = t + int(rng.integers(0, 5))
            t = start + int(rng.integers(1, 9))
            events.append((start, t, thread, f"{thread}{i % 4}"))
    for step in range(max(e[1] for e in events)):
        running = [e[3] for e in events if e[0] <= step < e[1]]
        for op in running:
            ref[op] += 1 / len(running)
    assert op_profile.wall_shares(events) == pytest.approx(dict(ref))
    # Inside a program, time no op runs in goes to the op that ended last: a float32 dot's
    # thunk ends before its Eigen threads do. Before the program's first op: the executor.
    events = [(2, 5, "a", "dot"), (8, 10, "b", "add")]
    shares = op_profile.wall_shares(events, programs=[(0, 12)])
    assert shares == pytest.approx({"(executor)": 2.0, "dot": 3 + 3, "add": 2 + 2})
    assert op_profile.wall_shares(events) == pytest.approx({"dot": 3.0, "add": 2.0})


def test_xla_flags_candidates_run_in_their_own_process(monkeypatch, tmp_path):
    out = xla_flags.main(
        [
            "--quick",
            "--rounds",
            "1",
            "--repeats",
            "2",
            "--candidates",
            "default,no_xnnpack",
            "--json",
            str(tmp_path / "f.json"),
        ]
    )
    assert set(out) == {"default", "no_xnnpack"}
    for s in out.values():
        assert s["train_ms"] > 0 and s["infer_ms"] > 0 and np.isfinite(s["rounds"][0]["final_loss"])
    assert out["default"]["train_ratio_vs_default"] == 1.0
    assert (
        json.loads((tmp_path / "f.json").read_text())["candidates"]["no_xnnpack"]["flags"]
        == "--xla_cpu_use_xnnpack=false"
    )
    with pytest.raises(ValueError, match="--candidates: unknown"):
        xla_flags.main(["--candidates", "default,nonsense"])
    # The flags reach the worker's XLA: one it does not know fails that candidate, by name.
    monkeypatch.setitem(xla_flags.CANDIDATES, "bogus", "--xla_cpu_no_such_flag=true")
    with pytest.raises(RuntimeError, match="candidate 'bogus'"):
        xla_flags.measure(["bogus"], 1, 2, 64, 5, 1)


def test_xla_flags_per_jit_applies_each_candidate_to_its_own_function(monkeypatch, tmp_path):
    assert xla_flags.flag_options("--a=b --c=true --d=false --e=") == (
        ("a", "b"),
        ("c", True),
        ("d", False),
        ("e", ""),
    )
    out = xla_flags.main(
        [
            "--per-jit",
            "--quick",
            "--repeats",
            "2",
            "--candidates",
            "default,no_ynn",
            "--json",
            str(tmp_path / "p.json"),
        ]
    )
    assert set(out) == {"default", "no_ynn"}
    assert out["no_ynn"]["infer_ms_b1"] > 0 and out["default"]["ratio_vs_default_b2"] == 1.0
    assert json.loads((tmp_path / "p.json").read_text())["per_jit"] is True
    # The options reach XLA: one it does not know fails at compile time.
    monkeypatch.setitem(xla_flags.CANDIDATES, "bogus", "--xla_cpu_no_such_flag=true")
    with pytest.raises(Exception, match="xla_cpu_no_such_flag"):
        xla_flags.measure_per_jit(["bogus"], (1,), 64, 5, 1)
