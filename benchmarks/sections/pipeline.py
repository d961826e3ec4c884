"""The grain input pipeline: images/s per worker count against what the train steps consume."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks import harness
from benchmarks.harness import Config, Json, core_count, fmt, section, spread, summarize

if TYPE_CHECKING:
    from fan_jax.input_pipeline import AugmentConfig


def synthetic_source(num: int, face_size: int, seed: int = 0) -> list[Json]:
    """In-memory examples in the TFDS layout of the 300W builder, from ``fan_jax.synthetic`` faces.

    ``datasets.common.make_example`` makes them exactly as the builder stores them (square crop
    with margin, JPEG bytes, 68 landmarks, box, to_original); no TFDS build. tfds.data_source
    would decode the JPEG when read; here ``TrainTransform`` does: the same work per image.
    """
    from fan_jax import synthetic
    from fan_jax_datasets import common  # datasets/ in a checkout

    out = []
    for i in range(num):
        img, lm = synthetic.render_face(synthetic.image_rng(seed, i), size=face_size)
        out.append(
            common.make_example(
                img, lm, common.landmark_box(lm), f"synthetic/{i:04d}.jpg", subset="synthetic"
            )
        )
    return out


def measure_throughput(
    source: Sequence[Mapping[str, Any]],
    num_workers: int = 0,
    *,
    num_landmarks: int | None = None,
    batch_size: int = 32,
    num_batches: int = 20,
    warmup_batches: int = 2,
    seed: int = 0,
    num_threads: int = 2,
    augment: AugmentConfig | None = None,
) -> float:
    """Train-pipeline images/s on this host (after warm-up, which absorbs worker start-up)."""
    from fan_jax.input_pipeline import train_iterator

    if num_landmarks is None:
        num_landmarks = int(np.asarray(source[0]["landmarks"]).shape[0])
    it = train_iterator(
        source,
        num_landmarks,
        seed=seed,
        global_batch_size=batch_size,
        augment=augment,
        num_workers=num_workers,
        shard_index=0,
        shard_count=1,
        num_threads=num_threads,
    )
    try:
        for _ in range(warmup_batches):
            next(it)
        t0 = time.perf_counter()
        for _ in range(num_batches):
            next(it)
        dt = time.perf_counter() - t0
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return num_batches * batch_size / dt


@section("pipeline")
def pipeline_section(cfg: Config) -> Json:
    """grain train-pipeline images/s per worker count, and the input cores each train step needs."""
    from fan_jax import input_pipeline

    source = synthetic_source(cfg.pipeline_examples, cfg.pipeline_face_size)
    L = int(np.asarray(source[0]["landmarks"]).shape[0])
    augment = input_pipeline.AugmentConfig(output_size=cfg.image_size)
    cores = core_count()
    out: Json = {
        "image_size": cfg.image_size,
        "num_landmarks": L,
        "batch": cfg.pipeline_batch,
        "batches_per_measurement": cfg.pipeline_batches,
        "source_examples": len(source),
        "mean_stored_jpeg_bytes": float(np.mean([len(e["image"]) for e in source])),
        "augment": dataclasses.asdict(augment),
        "threads_per_worker": 1,
        "workers": {},
    }
    # One thread per worker (and in-process): a worker is then one core, so cores used = workers.
    rates: dict[int, list[float]] = {w: [] for w in cfg.pipeline_workers}
    for _ in range(cfg.pipeline_repeats):  # interleaved, like time_interleaved
        for w in cfg.pipeline_workers:
            rates[w].append(
                measure_throughput(
                    source,
                    num_workers=w,
                    batch_size=cfg.pipeline_batch,
                    num_batches=cfg.pipeline_batches,
                    num_threads=1,
                    augment=augment,
                )
            )
    rows = []
    for w, r in rates.items():
        s = summarize([1.0 / x for x in r])  # seconds per image: median / spread as elsewhere
        n = min(max(w, 1), cores)
        s.update(
            images_per_s=s.pop("per_s"), cores_used=n, ms_core_per_image=1e3 * n * s["median_s"]
        )
        out["workers"][str(w)] = s
        what = "in-process" if w == 0 else f"{w} worker{'s' * (w > 1)}"
        rows.append(
            (
                f"pipeline images/s ({what}, {cfg.image_size}px, {s['ms_core_per_image']:.2g} ms*core/image)",
                fmt(s["images_per_s"]),
                "",
                "",
                spread(s),
            )
        )
    # A worker's cost, IPC included: what each added training input core buys.
    per_core = out["workers"].get("1", next(iter(out["workers"].values())))["ms_core_per_image"]
    out["ms_core_per_image"] = per_core
    out["consumers"] = {}
    for name in ("train", "distill", "accelerator"):
        c = harness.CONSUMERS.get(name)
        if c is None:
            out["consumers"][name] = "n/a (section not run in this report)"
            continue
        need = c["images_per_s"] * per_core / 1e3
        out["consumers"][name] = {**c, "pipeline_cores_needed": need}
        rows.append(
            (
                f"pipeline cores to feed the {c['step']} at {c['images_per_s']:.3g} images/s",
                fmt(need),
                "",
                "",
                "",
            )
        )
    if "train" not in harness.CONSUMERS:
        rows.append(("pipeline cores to feed the CPU student train step", "n/a", "", "", ""))
    out["summary"] = {
        "pipeline_images_per_s_" + _workers_key(int(k)): v["images_per_s"]
        for k, v in out["workers"].items()
    }
    out["rows"] = rows
    return out


def _workers_key(w: int) -> str:
    return "in_process" if w == 0 else f"{w}_worker" + "s" * (w > 1)
