"""Exported models (TFLite, ONNX) in their runtimes."""

from __future__ import annotations


from benchmarks.harness import Config, Json, fmt, ratio, section, spread


def _missing_export_modules(formats: tuple[str, ...]) -> dict[str, list[str]]:
    """{format: missing modules} for the exporters and runtimes each format needs."""
    import importlib.util

    needs = {"tflite": ("tensorflow", "ai_edge_litert"), "onnx": ("jax2onnx", "onnxruntime"),
             "savedmodel": ("tensorflow",)}
    out = {}
    for name in formats:
        missing = [m for m in needs.get(name.partition("_")[0], ()) if importlib.util.find_spec(m) is None]
        if missing:
            out[name] = missing
    return out


@section("export")
def export_section(cfg: Config) -> Json:
    """Batch-1 latency and file size of the exported student (TFLite, ONNX) in its runtime vs jitted JAX."""
    missing = _missing_export_modules(cfg.export_formats)
    formats = tuple(f for f in cfg.export_formats if f not in missing)
    note = {f: f"skipped: {', '.join(m)} not installed (pip install 'fan_jax[export]')" for f, m in missing.items()}
    if not formats:
        return {"skipped": "export dependencies missing", "formats": note}
    from fan_jax import export

    try:
        res = export.benchmark_exports(image_size=cfg.image_size, num_landmarks=cfg.num_landmarks,
                                       repeats=cfg.repeats, warmup=cfg.warmup, iters=cfg.export_iters_per_repeat,
                                       formats=formats, quick=cfg.quick)
    except ImportError as e:  # a dependency present but broken: a note, not a failed report
        return {"skipped": f"export dependencies unusable: {e}", "formats": note}
    res.pop("rows", None)  # rebuilt below in this report's number format
    res.update(note)
    jax_stats = res["jax"]
    rows = []
    for name in formats:
        s = res[name]
        speedup = ratio(jax_stats["latency_ms"], s["latency_ms"])
        s["speedup_vs_jax"] = speedup
        rows.append((f"export {name} latency ms (batch 1, {res['image_size']}px, {s['size_mib']:.3g} MiB file)",
                     fmt(s["latency_ms"]), fmt(jax_stats["latency_ms"]), fmt(speedup, "x"),
                     spread(s, jax_stats)))
    res["rows"] = rows
    return res
