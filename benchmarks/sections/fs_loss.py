"""The feature-similarity loss: the exact Gram form against the direct N x N form."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from benchmarks.harness import (
    Config,
    Json,
    bytes_field,
    fmt,
    mib,
    ratio,
    section,
    spread,
    summarize,
    time_interleaved,
)


@section("fs_loss")
def fs_loss_section(cfg: Config) -> Json:
    """Feature-similarity loss, forward + grad wrt student: N x N (direct) vs C x C Gram form."""
    import jax

    from fan_jax.losses import feature_similarity_direct, feature_similarity_gram

    b, n, cs, ct = cfg.fs_batch, cfg.fs_size, cfg.fs_student_channels, cfg.fs_teacher_channels
    rng = np.random.default_rng(0)
    # Post-ReLU taps are non-negative; match that so the cosine similarities look like real ones.
    student = jax.device_put(np.maximum(rng.standard_normal((b, n, n, cs), dtype=np.float32), 0))
    teacher = jax.device_put(np.maximum(rng.standard_normal((b, n, n, ct), dtype=np.float32), 0))
    out: Json = {
        "batch": b,
        "size": n,
        "student_channels": cs,
        "teacher_channels": ct,
        "device": str(jax.devices()[0]),
    }
    compiled, values = {}, {}
    for name, loss in (("direct", feature_similarity_direct), ("gram", feature_similarity_gram)):
        fn = jax.jit(jax.value_and_grad(loss))
        compiled[name] = fn.lower(student, teacher).compile()
        mem = compiled[name].memory_analysis()
        out[name] = {
            "temp_bytes": bytes_field(mem, "temp_size_in_bytes"),
            "argument_bytes": bytes_field(mem, "argument_size_in_bytes"),
            "output_bytes": bytes_field(mem, "output_size_in_bytes"),
        }

    def call(name: str) -> Callable[[], None]:
        def run() -> None:
            value, grad = compiled[name](student, teacher)
            grad.block_until_ready()
            values[name] = float(value)

        return run

    times = time_interleaved(
        {name: call(name) for name in compiled},
        cfg.repeats,
        cfg.warmup,
        repeats_per_fn={"direct": min(cfg.repeats, cfg.fs_direct_repeats)},
    )
    for name in compiled:
        out[name].update(summarize(times[name]))
        out[name]["value"] = values[name]
    out["value_rel_diff"] = abs(values["gram"] - values["direct"]) / max(
        abs(values["direct"]), 1e-30
    )
    speedup = ratio(out["direct"]["median_s"], out["gram"]["median_s"])
    mem_ratio = ratio(out["direct"]["temp_bytes"], out["gram"]["temp_bytes"])
    out["summary"] = {"fs_gram_speedup": speedup, "fs_gram_memory_ratio": mem_ratio}
    label = f"FS loss fwd+grad (b{b}, {n}x{n}, {cs}/{ct} ch)"
    out["rows"] = [
        (
            f"{label} ms, gram vs direct",
            fmt(1e3 * out["gram"]["median_s"]),
            fmt(1e3 * out["direct"]["median_s"]),
            fmt(speedup, "x"),
            spread(out["gram"], out["direct"]),
        ),
        (
            "FS loss temp memory MiB, gram vs direct",
            fmt(mib(out["gram"]["temp_bytes"])),
            fmt(mib(out["direct"]["temp_bytes"])),
            fmt(mem_ratio, "x"),
            "",
        ),
    ]
    return out
