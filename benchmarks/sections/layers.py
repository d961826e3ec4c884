"""Layer by layer: each of the student's layers timed on its own against its own bounds.

    python benchmarks/run.py --sections layers

A "unit" is what runs as one piece in the model: a convolution (stem, expand, depthwise,
project, deconvolution, head) with the BatchNorm and activation that follow it. The units
and their input shapes come from one traced forward of the real student (`flax`'s method
interception), so the list follows the model. Each unit is jitted alone and timed in
inference (eval BN, batch `layers_infer_batch`) and in training (batch BN and the backward
pass, batch `layers_train_batch`), and set against two bounds:

- compute: its FLOPs (counted from the shapes: 2 per multiply-add of the convolution, as the
  textbook conv, with no FLOPs for padding or zero taps) over the machine's matmul rate;
- memory: its minimal traffic (read the input and weights once, write the output once; for
  training also read the output gradient and write the input and weight gradients) over
  this machine's measured streaming rate at that working-set size (an elementwise
  read-and-write kernel, so the rate includes what caches give a layer of that size).

`fraction_of_bound` = max(compute, memory bound) / time, with time net of the fixed cost
of one jitted call (measured on a trivial program): 1.0 means the layer runs at its bound.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.harness import Config, Json, cpu_device, fmt, section, summarize, time_interleaved
from benchmarks.jax_runners import build_student, init_variables, matmul_peak

F32 = 4  # bytes per element: the CPU path runs in float32


@dataclasses.dataclass
class Unit:
    """One convolution and the BatchNorm (+ activation) that follows it in the model."""

    name: str
    modules: list[Any]  # unbound flax modules, applied in order
    variables: list[Json]  # each module's own variables
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    conv_flops_per_image: float  # multiply-adds x 2 of the convolution, batch 1

    @property
    def kind(self) -> str:
        return type(self.modules[0]).__name__


def _conv_flops(module: Any, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> float:
    from fan_jax.models import layers

    cin, (ho, wo, cout) = in_shape[-1], out_shape[1:]
    if isinstance(module, layers.PointwiseConv):
        return 2.0 * ho * wo * cin * cout
    if isinstance(module, layers.DepthwiseConv):
        return 2.0 * ho * wo * cout * module.kernel_size**2
    if isinstance(module, layers.ConvTranspose):
        # Every input pixel scatters a k x k x Cout stamp (PyTorch's definition).
        return 2.0 * in_shape[1] * in_shape[2] * cin * cout * module.kernel_size**2
    taps = (
        module.kernel_size**2
        if isinstance(module, layers.PatchConv)
        else math.prod(module.kernel_size)
    )
    return 2.0 * ho * wo * cin * cout * taps


def _subtree(variables: Json, path: tuple[str, ...]) -> Json:
    out = {}
    for collection, tree in variables.items():
        for key in path:
            tree = tree.get(key) if isinstance(tree, dict) else None
            if tree is None:
                break
        if tree is not None:
            out[collection] = tree
    return out


def student_units(model: Any, variables: Json, image_shape: tuple[int, ...]) -> list[Unit]:
    """The model's convolution units in call order, from one traced eval-mode forward."""
    import jax
    from flax import linen as nn

    from fan_jax.models import layers

    convs = (
        layers.PatchConv,
        layers.PointwiseConv,
        layers.DepthwiseConv,
        layers.ConvTranspose,
        nn.Conv,
    )
    calls: list[tuple] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        m = context.module
        if context.method_name == "__call__" and isinstance(m, (*convs, layers.BatchNorm)):
            path = tuple(m.scope.path)
            calls.append(
                (path, m.clone(parent=None, name=None), tuple(args[0].shape), tuple(out.shape))
            )
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(
            lambda v, x: model.apply(v, x, train=False),
            variables,
            jax.ShapeDtypeStruct(image_shape, np.float32),
        )
    units: list[Unit] = []
    for i, (path, module, in_shape, out_shape) in enumerate(calls):
        if not isinstance(module, convs):
            continue
        mods, vars_, out = [module], [_subtree(variables, path)], out_shape
        if (
            i + 1 < len(calls)
            and isinstance(calls[i + 1][1], layers.BatchNorm)
            and calls[i + 1][2] == out_shape
        ):
            mods.append(calls[i + 1][1])
            vars_.append(_subtree(variables, calls[i + 1][0]))
        units.append(
            Unit(
                "/".join(path[-2:]) if path[0] == "decoder" else path[-1],
                mods,
                vars_,
                in_shape[1:],
                out,
                _conv_flops(module, in_shape, out_shape) / in_shape[0],
            )
        )
    return units


def _unit_fn(unit: Unit, train: bool):
    """(variables, x) -> y of the unit; in training, BN uses batch statistics."""
    from fan_jax.models import layers

    def apply(vs, x):
        for m, v in zip(unit.modules, vs):
            if isinstance(m, layers.BatchNorm):
                m = m.clone(use_running_average=not train)
                x = m.apply(v, x, mutable=["batch_stats"])[0] if train else m.apply(v, x)
            else:
                x = m.apply(v, x)
        return x

    return apply


def _param_bytes(vs: list[Json]) -> int:
    import jax

    return F32 * sum(
        int(np.prod(leaf.shape)) for v in vs for leaf in jax.tree.leaves(v.get("params", {}))
    )


def _traffic_and_flops(unit: Unit, batch: int, train: bool, first: bool) -> tuple[float, float]:
    x = F32 * batch * math.prod(unit.in_shape)
    y = F32 * batch * math.prod(unit.out_shape[1:])
    w = _param_bytes(unit.variables)
    conv = unit.conv_flops_per_image * batch
    bn = 2.0 * y / F32 if len(unit.modules) > 1 else 0.0  # scale and shift per output element
    if not train:
        return x + y + w, conv + bn
    # Forward (read x, w; write y), backward (read dy and x again; write dx and dw; read w);
    # the image needs no gradient, so the stem writes no dx and skips that matmul.
    dx = 0 if first else x
    return (x + y + w) + (y + x + dx + 2 * w), conv * (2 if first else 3) + 3 * bn


def streaming_rates(device: Any, sizes: tuple[int, ...], repeats: int) -> list[tuple[int, float]]:
    """[(bytes moved per pass, bytes/s)]: an elementwise `x * a + b` over a buffer of each
    size, repeated in place inside one jitted loop (no per-pass dispatch): the memory rate
    a layer of that working-set size sees, caches included."""
    import jax
    import jax.numpy as jnp

    out = []
    for nbytes in sizes:
        n = max(1024, nbytes // (2 * F32))
        passes = max(1, (256 << 20) // (2 * F32 * n))
        f = jax.jit(
            lambda x, passes=passes: jax.lax.fori_loop(0, passes, lambda i, x: x * 0.999 + 0.001, x)
        )
        x = jax.device_put(jnp.ones((n,), jnp.float32), device)
        run = {"s": lambda f=f, x=x: f(x).block_until_ready()}
        t = summarize(time_interleaved(run, repeats, warmup=1)["s"])
        out.append((2 * F32 * n, 2 * F32 * n * passes / t["median_s"]))
    return out


def _rate_at(rates: list[tuple[int, float]], nbytes: float) -> float:
    """The measured streaming rate at the first size >= nbytes (the largest size beyond)."""
    i = bisect.bisect_left([s for s, _ in rates], nbytes)
    return rates[min(i, len(rates) - 1)][1]


def call_overhead_s(device: Any, repeats: int) -> float:
    """Seconds of one call of a trivial jitted program (dispatch + sync): the floor every
    layer timed alone pays and the whole model pays once."""
    import jax
    import jax.numpy as jnp

    x = jax.device_put(jnp.ones((8,), jnp.float32), device)
    f = jax.jit(lambda x: x + 1.0).lower(x).compile()
    f(x).block_until_ready()
    iters = 200

    def run():
        for _ in range(iters):
            y = f(x)
        y.block_until_ready()

    return summarize(time_interleaved({"c": run}, repeats, warmup=1)["c"])["median_s"] / iters


def _time_unit(
    unit: Unit, batch: int, train: bool, first: bool, cfg: Config, device: Any
) -> tuple[float, Json]:
    import jax
    import jax.numpy as jnp

    apply = _unit_fn(unit, train)
    rng = np.random.default_rng(0)
    x = jax.device_put(
        jnp.asarray(rng.standard_normal((batch, *unit.in_shape)), jnp.float32), device
    )
    vs = jax.device_put(unit.variables, device)
    if train:
        g = jax.device_put(
            jnp.asarray(rng.standard_normal((batch, *unit.out_shape[1:])), jnp.float32), device
        )

        def step(vs, x, g):
            params = [v.get("params", {}) for v in vs]

            def loss(params, x):
                full = [{**v, "params": p} if p else v for v, p in zip(vs, params)]
                return jnp.vdot(apply(full, x), g)

            return jax.grad(loss, argnums=(0,) if first else (0, 1))(params, x)

        exe = jax.jit(step).lower(vs, x, g).compile()
        call = lambda: jax.block_until_ready(exe(vs, x, g))  # noqa: E731
    else:
        from fan_jax import compiler  # the inference role's options, as Predictor compiles with

        exe = (
            jax.jit(apply, compiler_options=compiler.compiler_options("predict"))
            .lower(vs, x)
            .compile()
        )
        call = lambda: jax.block_until_ready(exe(vs, x))  # noqa: E731
    call()
    # Enough calls per repeat for ~20 ms, so timer resolution and jitter stay small.
    t0 = summarize(time_interleaved({"u": call}, 2, warmup=0)["u"])["median_s"]
    iters = max(1, min(200, int(0.02 / max(t0, 1e-6))))

    def run():
        for _ in range(iters):
            call()

    s = summarize(time_interleaved({"u": run}, cfg.repeats, warmup=0)["u"])
    return s["median_s"] / iters, {"spread": s["spread"], "iters_per_repeat": iters}


def _units_for(cfg: Config, units: list[Unit]) -> list[Unit]:
    if not cfg.quick:
        return units
    # One unit of each kind (the CI smoke test): stem, expand, depthwise, project, deconv, head.
    seen, keep = set(), []
    for u in units:
        key = (u.kind, u.name.rsplit("_", 1)[-1])
        if key not in seen:
            seen.add(key)
            keep.append(u)
    return keep


def _mode(
    cfg: Config,
    units: list[Unit],
    train: bool,
    batch: int,
    peak: float,
    rates,
    overhead: float,
    device: Any,
) -> Json:
    rows, total = (
        [],
        {
            "ms": 0.0,
            "net_ms": 0.0,
            "compute_bound_ms": 0.0,
            "memory_bound_ms": 0.0,
            "bound_ms": 0.0,
            "flops": 0.0,
            "bytes": 0.0,
        },
    )
    for i, u in enumerate(units):
        first = i == 0 and u.in_shape[-1] == 3
        t, extra = _time_unit(u, batch, train, first, cfg, device)
        nbytes, flops = _traffic_and_flops(u, batch, train, first)
        net = max(t - overhead, 1e-9)
        compute, memory = flops / peak, nbytes / _rate_at(rates, nbytes)
        bound = max(compute, memory)
        row = {
            "layer": u.name,
            "kind": u.kind,
            "in_shape": [batch, *u.in_shape],
            "out_shape": [batch, *u.out_shape[1:]],
            "ms": 1e3 * t,
            "net_ms": 1e3 * net,
            "flops": flops,
            "bytes": nbytes,
            "compute_bound_ms": 1e3 * compute,
            "memory_bound_ms": 1e3 * memory,
            "bound": "compute" if compute >= memory else "memory",
            "fraction_of_bound": bound / net,
            **extra,
        }
        rows.append(row)
        for k in ("ms", "net_ms", "compute_bound_ms", "memory_bound_ms", "flops", "bytes"):
            total[k] += row[k]
        total["bound_ms"] += 1e3 * bound
    total["fraction_of_bound"] = total["bound_ms"] / total["net_ms"]
    fractions = sorted(r["fraction_of_bound"] for r in rows)
    return {
        "batch": batch,
        "layers": rows,
        "total": total,
        "median_fraction_of_bound": fractions[len(fractions) // 2],
        "layers_within_80pct_of_bound": sum(f >= 0.8 for f in fractions),
        "layers_within_50pct_of_bound": sum(f >= 0.5 for f in fractions),
        "num_layers": len(rows),
    }


@section("layers")
def layers_section(cfg: Config) -> Json:
    """Each student layer (conv + BN + activation) alone, inference and train, against its FLOP and byte bounds."""
    device = cpu_device()
    size, L = cfg.image_size, cfg.num_landmarks
    peak_info = harness.CONSUMERS.get("matmul_peak") or matmul_peak(
        device, n=512 if cfg.quick else 2048, repeats=cfg.repeats
    )
    peak = peak_info["flops_per_s"]
    sizes = (1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26) if not cfg.quick else (1 << 18, 1 << 22)
    rates = streaming_rates(device, sizes, cfg.repeats)
    overhead = call_overhead_s(device, cfg.repeats)
    units = _units_for(
        cfg, student_units(build_student(L), init_variables(L, size), (1, size, size, 3))
    )
    out: Json = {
        "image_size": size,
        "matmul_peak_flops_per_s": peak,
        "call_overhead_ms": 1e3 * overhead,
        "streaming_rates": [{"bytes": s, "bytes_per_s": r} for s, r in rates],
    }
    out["inference"] = _mode(
        cfg, units, False, cfg.layers_infer_batch, peak, rates, overhead, device
    )
    out["train"] = _mode(cfg, units, True, cfg.layers_train_batch, peak, rates, overhead, device)
    rows = [
        (f"streaming read+write GB/s at {s / 2**20:.2g} MiB", fmt(r / 1e9), "", "", "")
        for s, r in rates
    ]
    rows.append(("jitted call overhead ms (trivial program)", fmt(1e3 * overhead), "", "", ""))
    for mode in ("inference", "train"):
        m = out[mode]
        rows.append(
            (
                f"{mode} layers (batch {m['batch']}): sum of net ms vs sum of bounds "
                f"({m['layers_within_80pct_of_bound']}/{m['num_layers']} layers within 80%)",
                fmt(m["total"]["net_ms"]),
                fmt(m["total"]["bound_ms"]),
                fmt(m["total"]["fraction_of_bound"]),
                "",
            )
        )
        for r in m["layers"]:
            rows.append(
                (
                    f"  {mode} {r['layer']} {r['kind']} {r['in_shape'][1:]}->{r['out_shape'][1:]} "
                    f"ms vs {r['bound']} bound",
                    fmt(r["net_ms"]),
                    fmt(max(r["compute_bound_ms"], r["memory_bound_ms"])),
                    fmt(r["fraction_of_bound"]),
                    f"{100 * r['spread']:.0f}%",
                )
            )
    out["summary"] = {
        "layers_inference_fraction_of_bound": out["inference"]["total"]["fraction_of_bound"],
        "layers_train_fraction_of_bound": out["train"]["total"]["fraction_of_bound"],
    }
    out["rows"] = rows
    return out
