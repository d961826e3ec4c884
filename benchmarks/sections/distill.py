"""The distilled step (FA + FS against the frozen teacher) against the plain step."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from benchmarks import harness
from benchmarks.harness import (
    Config,
    Json,
    core_count,
    cpu_device,
    fmt,
    mib,
    ratio,
    section,
    spread,
    summarize,
    time_interleaved,
)
from benchmarks.jax_runners import StepRunner, distill_parts


@section("distill")
def distill_section(cfg: Config) -> Json:
    """Distilled train step (student + frozen teacher, FA1-3 + FS1-3) images/s vs the plain student step."""
    import concurrent.futures

    import optax

    from fan_jax import steps

    b, size, L = cfg.train_batch, cfg.image_size, cfg.num_landmarks
    # On the CPU, beside the train section's numbers.
    p = distill_parts(cfg.distill_student, cfg.distill_teacher, L, b, size, cpu_device())
    tx = optax.adam(1e-3)

    def distill(form: str) -> Callable:
        return functools.partial(
            steps.distill_step,
            model=p.student,
            adapters=p.adapters,
            teacher=p.teacher,
            tx=tx,
            fs_form=form,
        )

    runners = {
        "plain": StepRunner(
            functools.partial(steps.train_step, model=p.student, tx=tx),
            p.state(tx, False),
            (),
            p.batch,
        ),
        "distill_gram": StepRunner(distill("gram"), p.state(tx), (p.teacher_vars,), p.batch),
        "distill_direct": StepRunner(distill("direct"), p.state(tx), (p.teacher_vars,), p.batch),
    }
    # XLA's compile releases the GIL: two at a time overlap on two cores (~1 min each here).
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(2, core_count())) as pool:
        list(pool.map(StepRunner.compile, runners.values()))
    compile_wall_s = time.perf_counter() - t0
    repeats = min(cfg.repeats, cfg.distill_repeats)
    times = time_interleaved(
        {k: (lambda r=r: r.run(1)) for k, r in runners.items()},
        cfg.repeats,
        cfg.warmup,
        repeats_per_fn={
            "distill_gram": repeats,
            "distill_direct": min(repeats, cfg.distill_direct_repeats),
        },
    )
    out: Json = {
        "batch": b,
        "image_size": size,
        "num_landmarks": L,
        "student": cfg.distill_student,
        "teacher": cfg.distill_teacher,
        "adapters": "conv",
        "terms": "FA1-3 + FS1-3",
        "lam": 1e-4,
        "device": str(p.device),
        "compile_wall_s": compile_wall_s,
        "repeats_note": f"distill steps: {repeats} repeats (direct form: "
        f"{min(repeats, cfg.distill_direct_repeats)}), plain step: {cfg.repeats}, "
        "to keep the section to minutes on a small CPU",
    }
    for name, r in runners.items():
        out[name] = summarize(times[name], work=b)
        out[name].update(
            compile_s=r.compile_s,
            temp_bytes=r.temp_bytes(),
            first_loss=r.first_loss,
            final_loss=float(r.metrics["loss"]),
        )
    gram, direct, plain = out["distill_gram"], out["distill_direct"], out["plain"]
    # Same initial state, teacher and batch: the two FS forms must compute the same first loss
    # (the final ones differ: the runners took different numbers of steps).
    out["loss_rel_diff_gram_vs_direct"] = abs(gram["first_loss"] - direct["first_loss"]) / max(
        abs(direct["first_loss"]), 1e-30
    )
    harness.CONSUMERS["distill"] = {
        "images_per_s": gram["per_s"],
        "batch": b,
        "image_size": size,
        "step": "CPU distilled train step, Gram FS (distill section)",
    }
    vs_plain = ratio(gram["per_s"], plain["per_s"])
    gram_speedup = ratio(gram["per_s"], direct["per_s"])
    out["summary"] = {
        "distill_images_per_s": gram["per_s"],
        "distill_speed_vs_plain_step": vs_plain,
        "distill_gram_speedup_vs_direct": gram_speedup,
    }
    label = f"(batch {b}, {size}px)"
    out["rows"] = [
        (
            f"distill step images/s {label}, vs plain student step",
            fmt(gram["per_s"]),
            fmt(plain["per_s"]),
            fmt(vs_plain, "x"),
            spread(gram, plain),
        ),
        (
            f"distill step images/s {label}, Gram vs direct N x N FS",
            fmt(gram["per_s"]),
            fmt(direct["per_s"]),
            fmt(gram_speedup, "x"),
            spread(gram, direct),
        ),
        (
            "distill step temp memory MiB, Gram vs direct FS",
            fmt(mib(gram["temp_bytes"])),
            fmt(mib(direct["temp_bytes"])),
            fmt(ratio(direct["temp_bytes"], gram["temp_bytes"]), "x"),
            "",
        ),
    ]
    return out
