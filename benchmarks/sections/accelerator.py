"""The accelerator section: what a GPU or TPU does with the student, in float32 and bfloat16.

    python benchmarks/run.py --sections accelerator            # on the GPU/TPU JAX sees
    python benchmarks/run.py --sections accelerator --quick    # tiny shapes, any backend (CI)

Reports, on `jax.devices()[0]`: the device's matmul rate (float32 and bf16: the bound every
figure is also given as a fraction of, from XLA's FLOP count of the program); the student's
train images/s at batches 1, 8 and 256 and inference images/s at 1 and 256, each in float32
and bf16 (`train.compute_dtype`); the distilled step (FA1-3 + FS1-3 against the ResNet-50
teacher); and the two forms of `fan_jax/models/layers/` ('matmul', 'lax'), per layer and for
the whole train step, so `layers.CONV_IMPL_DEFAULTS` can say which form this backend should use.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.harness import (
    Config,
    Json,
    fmt,
    ratio,
    section,
    spread,
    summarize,
    time_interleaved,
)
from benchmarks.jax_runners import (
    JaxStudentPredictor,
    JaxStudentTrainer,
    StepRunner,
    distill_parts,
    flops_of,
    matmul_peak,
    traced_with,
    with_peak,
)


def _peaks(cfg: Config, device: Any) -> Json:
    n = 256 if cfg.quick else 4096
    return {d: matmul_peak(device, d, n=n, repeats=cfg.repeats) for d in cfg.accel_dtypes}


def _dtype_row(label: str, by_dtype: Json, key: str) -> tuple:
    """bf16 vs float32 where both ran; otherwise the one dtype's figure."""
    if set(by_dtype) >= {"float32", "bfloat16"}:
        bf16, f32 = by_dtype["bfloat16"], by_dtype["float32"]
        return (
            f"{label}, bf16 vs float32",
            fmt(bf16[key]),
            fmt(f32[key]),
            fmt(ratio(bf16[key], f32[key]), "x"),
            spread(bf16, f32),
        )
    ((d, s),) = by_dtype.items()
    return (f"{label}, {d}", fmt(s[key]), "", "", "")


def _distill_runners(cfg: Config, device: Any) -> dict[str, StepRunner]:
    import optax

    from fan_jax import steps

    p = distill_parts(
        cfg.distill_student,
        cfg.distill_teacher,
        cfg.num_landmarks,
        cfg.accel_distill_batch,
        cfg.image_size,
        device,
    )
    tx = optax.adam(1e-3)
    return {
        d: StepRunner(
            functools.partial(
                steps.distill_step,
                model=p.student,
                adapters=p.adapters,
                teacher=p.teacher,
                tx=tx,
                compute_dtype=d,
            ),
            p.state(tx),
            (p.teacher_vars,),
            p.batch,
        ).compile()
        for d in cfg.accel_dtypes
    }


def _layer_cases(cfg: Config) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """{name: (flax layer, input shape)}: the student's (and teacher's) layer kinds at the
    shapes a 256 px crop gives them (scaled down with the image size in --quick mode)."""
    from fan_jax.models.layers import ConvTranspose, DepthwiseConv, PointwiseConv

    b, r = cfg.accel_layer_batch, cfg.image_size // 256 or 1
    q = max(1, cfg.image_size // 4)  # the 64x64 stage of a 256 px crop
    cases = {
        "pointwise 24->144 @64x64": (PointwiseConv(144), (b, q, q, 24)),
        "depthwise 3x3 s1 144ch @64x64": (DepthwiseConv(3, strides=1), (b, q, q, 144)),
        "depthwise 3x3 s2 144ch @64x64": (DepthwiseConv(3, strides=2), (b, q, q, 144)),
        "deconv k2 s2 320->128 @8x8": (ConvTranspose(128, 2, strides=2), (b, 8 * r, 8 * r, 320)),
        "deconv k4 s2 p1 2048->256 @8x8": (
            ConvTranspose(256, 4, strides=2, torch_padding=1),
            (b, 8 * r, 8 * r, 2048),
        ),
    }
    if cfg.quick:  # one of each kind keeps the CI smoke test short
        cases = {k: v for k, v in cases.items() if "s1" not in k and "k4" not in k}
    return cases


def _layer_forms(cfg: Config, device: Any) -> Json:
    """Forward + backward ms of each layer in each form, interleaved."""
    import jax
    import jax.numpy as jnp

    out: Json = {}
    for name, (layer, shape) in _layer_cases(cfg).items():
        x = jax.device_put(
            jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32), device
        )
        params = jax.device_put(layer.init(jax.random.PRNGKey(0), x), device)
        fns, flops = {}, {}
        for impl in ("matmul", "lax"):
            loss = traced_with(
                impl, lambda p, x, layer=layer: jnp.sum(jnp.square(layer.apply(p, x)))
            )
            exe = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
            flops[impl] = flops_of(exe)
            fns[impl] = lambda e=exe, p=params, x=x: jax.block_until_ready(e(p, x))
        iters = cfg.accel_iters_per_repeat
        times = time_interleaved(
            {k: (lambda f=f, n=iters: [f() for _ in range(n)]) for k, f in fns.items()},
            cfg.repeats,
            cfg.warmup,
        )
        row = {}
        for impl in fns:
            t = summarize(times[impl])
            row[impl] = {
                "ms": 1e3 * t["median_s"] / iters,
                "spread": t["spread"],
                "flops": flops[impl],
            }
        row["faster"] = min(("matmul", "lax"), key=lambda k: row[k]["ms"])
        row["shape"] = list(shape)
        out[name] = row
    return out


@section("accelerator")
def accelerator_section(cfg: Config) -> Json:
    """Train / inference images/s in float32 and bf16, the distilled step, and matmul vs lax conv forms on the GPU/TPU (skipped on CPU unless asked by name)."""
    import jax

    backend = jax.default_backend()
    if backend == "cpu" and not cfg.force_accelerator:
        return {"skipped": "no accelerator (jax.default_backend() == 'cpu')"}
    from fan_jax.models import layers

    device = jax.devices()[0]
    size, L = cfg.image_size, cfg.num_landmarks
    peaks = _peaks(cfg, device)
    out: Json = {
        "backend": backend,
        "device": str(device),
        "image_size": size,
        "matmul_peak": peaks,
        "conv_impl_default": layers.CONV_IMPL_DEFAULTS.get(backend),
        "train": {d: {} for d in cfg.accel_dtypes},
        "inference": {d: {} for d in cfg.accel_dtypes},
    }
    rows = [
        (
            f"{backend} matmul TFLOP/s ({d}, n={peaks[d]['n']})",
            fmt(peaks[d]["flops_per_s"] / 1e12),
            "",
            "",
            "",
        )
        for d in cfg.accel_dtypes
    ]
    steps_ = cfg.accel_steps_per_repeat
    for b in cfg.accel_train_batches:
        trainers = {
            d: JaxStudentTrainer(L, b, size, device=device, compute_dtype=d)
            for d in cfg.accel_dtypes
        }
        times = time_interleaved(
            {d: (lambda t=t: t.run(steps_)) for d, t in trainers.items()}, cfg.repeats, cfg.warmup
        )
        for d, t in trainers.items():
            s = with_peak(summarize(times[d], b * steps_), t.flops, steps_, peaks[d]["flops_per_s"])
            s.update(compile_s=t.compile_s, final_loss=float(t.loss))
            out["train"][d][str(b)] = s
        rows.append(
            _dtype_row(
                f"{backend} train images/s (batch {b})",
                {d: out["train"][d][str(b)] for d in cfg.accel_dtypes},
                "per_s",
            )
        )
    biggest = str(max(cfg.accel_train_batches))
    # The dtype the pipeline section compares its throughput with: bf16 where measured.
    feed = "bfloat16" if "bfloat16" in cfg.accel_dtypes else cfg.accel_dtypes[0]
    harness.CONSUMERS["accelerator"] = {
        "images_per_s": out["train"][feed][biggest]["per_s"],
        "batch": int(biggest),
        "image_size": size,
        "step": f"{backend} student {feed} train step (accelerator section, largest batch)",
    }
    iters = cfg.accel_iters_per_repeat
    for b in cfg.accel_infer_batches:
        preds = {
            d: JaxStudentPredictor(L, b, size, device=device, compute_dtype=d)
            for d in cfg.accel_dtypes
        }
        times = time_interleaved(
            {d: (lambda p=p: p.run(iters)) for d, p in preds.items()}, cfg.repeats, cfg.warmup
        )
        for d, p in preds.items():
            s = with_peak(summarize(times[d], b * iters), p.flops, iters, peaks[d]["flops_per_s"])
            s.update(latency_ms=1e3 * s["median_s"] / iters, compile_s=p.compile_s)
            out["inference"][d][str(b)] = s
        rows.append(
            _dtype_row(
                f"{backend} inference images/s (batch {b})",
                {d: out["inference"][d][str(b)] for d in cfg.accel_dtypes},
                "per_s",
            )
        )

    runners = _distill_runners(cfg, device)
    times = time_interleaved(
        {d: (lambda r=r: r.run(1)) for d, r in runners.items()}, cfg.repeats, cfg.warmup
    )
    b = cfg.accel_distill_batch
    out["distill"] = {"batch": b, "student": cfg.distill_student, "teacher": cfg.distill_teacher}
    for d, r in runners.items():
        s = with_peak(summarize(times[d], b), flops_of(r.compiled), 1, peaks[d]["flops_per_s"])
        s.update(compile_s=r.compile_s, final_loss=float(r.metrics["loss"]))
        out["distill"][d] = s
    rows.append(
        _dtype_row(
            f"{backend} distilled step images/s (batch {b}, {cfg.distill_teacher} teacher)",
            {d: out["distill"][d] for d in cfg.accel_dtypes},
            "per_s",
        )
    )

    out["layer_forms"] = _layer_forms(cfg, device)
    for name, row in out["layer_forms"].items():
        rows.append(
            (
                f"{backend} {name} fwd+bwd ms, matmul vs lax form",
                fmt(row["matmul"]["ms"]),
                fmt(row["lax"]["ms"]),
                fmt(ratio(row["lax"]["ms"], row["matmul"]["ms"]), "x"),
                "",
            )
        )
    b = cfg.accel_forms_batch
    # The default form's step is the one already compiled above (impl None).
    forms = {
        impl: JaxStudentTrainer(
            L, b, size, device=device, impl=None if impl == layers.conv_impl() else impl
        )
        for impl in ("matmul", "lax")
    }
    times = time_interleaved(
        {k: (lambda t=t: t.run(steps_)) for k, t in forms.items()}, cfg.repeats, cfg.warmup
    )
    out["train_step_forms"] = {
        k: with_peak(
            summarize(times[k], b * steps_),
            t.flops,
            steps_,
            peaks.get("float32", {}).get("flops_per_s"),
        )
        for k, t in forms.items()
    }
    m, x = out["train_step_forms"]["matmul"], out["train_step_forms"]["lax"]
    out["train_step_forms"]["faster"] = "matmul" if m["per_s"] >= x["per_s"] else "lax"
    rows.append(
        (
            f"{backend} float32 train images/s (batch {b}), matmul vs lax form",
            fmt(m["per_s"]),
            fmt(x["per_s"]),
            fmt(ratio(m["per_s"], x["per_s"]), "x"),
            spread(m, x),
        )
    )
    out["summary"] = {
        f"accelerator_train_images_per_s_{'bf16' if feed == 'bfloat16' else feed}": out["train"][
            feed
        ][biggest]["per_s"],
        "accelerator_faster_conv_form": out["train_step_forms"]["faster"],
    }
    out["rows"] = rows
    return out
