"""The accelerator section: train and inference throughput on a GPU or TPU."""

from __future__ import annotations


from benchmarks import harness
from benchmarks.harness import Config, Json, fmt, section, spread, summarize, time_interleaved
from benchmarks.jax_runners import JaxStudentPredictor, JaxStudentTrainer


@section("accelerator")
def accelerator_section(cfg: Config) -> Json:
    """Train and inference images/s on the default GPU/TPU (skipped on CPU unless asked by name)."""
    import jax

    backend = jax.default_backend()
    if backend == "cpu" and not cfg.force_accelerator:
        return {"skipped": "no accelerator (jax.default_backend() == 'cpu')"}
    device = jax.devices()[0]
    size, L = cfg.image_size, cfg.num_landmarks
    out: Json = {"backend": backend, "device": str(device), "image_size": size, "train": {}, "inference": {}}
    rows = []
    for b in cfg.accel_train_batches:
        trainer = JaxStudentTrainer(L, b, size, device=device)
        steps = cfg.accel_steps_per_repeat
        s = summarize(time_interleaved({"t": lambda: trainer.run(steps)}, cfg.repeats, cfg.warmup)["t"], b * steps)
        s["compile_s"] = trainer.compile_s
        out["train"][str(b)] = s
        harness.CONSUMERS["accelerator"] = {"images_per_s": s["per_s"], "batch": b, "image_size": size,
                                    "step": f"{backend} student train step (accelerator section, largest batch)"}
        rows.append((f"{backend} train images/s (batch {b})", fmt(s["per_s"]), "", "", spread(s)))
    for b in cfg.accel_infer_batches:
        predictor = JaxStudentPredictor(L, b, size, device=device)
        iters = cfg.accel_iters_per_repeat
        s = summarize(time_interleaved({"p": lambda: predictor.run(iters)}, cfg.repeats, cfg.warmup)["p"], b * iters)
        s["latency_ms"] = 1e3 * s["median_s"] / iters
        s["compile_s"] = predictor.compile_s
        out["inference"][str(b)] = s
        rows.append((f"{backend} inference images/s (batch {b})", fmt(s["per_s"]), "", "", spread(s)))
    out["rows"] = rows
    return out
