"""Layer by layer, inside the whole compiled program, against each layer's own bounds.

    python benchmarks/run.py --sections layers
    python benchmarks/op_profile.py          # the same profile, op by op, float32 and bf16

A "unit" is what runs as one piece in the model: a convolution (stem, expand, depthwise,
project, deconvolution, head) with the BatchNorm and activation that follow it. The units
and their input shapes come from one traced forward of the real student (`flax`'s method
interception), so the list follows the model. Their times come from `jax.profiler` traces of
the whole compiled student (`benchmarks.op_profile`): the program `Predictor` runs (uint8
crops in, landmarks out) at batch `layers_infer_batch`, and the real train step at batch
`layers_train_batch`. An op's time is its share of the traced program's time (ops that XLA
runs at once on several threads split the time they overlap; the gaps between ops go to the
op before), scaled to the program's wall time outside the trace (the tracer slows some
programs, unevenly); it goes to the unit whose module path its `op_name` names, and an op
that XLA fused from several layers goes to the one most of its instructions come from (the
stem's 27 taps, fused with the next layer's padding, count as the stem). What no unit claims (input handling and the decode; the loss and optimizer) is
reported beside them, and the units plus that are set against the program's wall time.
Timing a layer alone instead would add one dispatch per layer (the isolated times summed to
3x the network).

Each unit is set against two bounds:

- compute: its FLOPs (counted from the shapes: 2 per multiply-add of the convolution, as the
  textbook conv, with no FLOPs for padding or zero taps) over the machine's matmul rate;
- memory: its minimal traffic (read the input and weights once, write the output once; for
  training also read the output gradient and write the input and weight gradients) over
  this machine's measured streaming rate at that working-set size (an elementwise
  read-and-write kernel, so the rate includes what caches give a layer of that size).

`fraction_of_bound` = max(compute, memory bound) / profiled time: 1.0 means the layer runs
at its bound.
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
    paths: list[tuple[str, ...]] = dataclasses.field(default_factory=list)  # each module's

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
        mods, vars_, out, paths = [module], [_subtree(variables, path)], out_shape, [path]
        if (
            i + 1 < len(calls)
            and isinstance(calls[i + 1][1], layers.BatchNorm)
            and calls[i + 1][2] == out_shape
        ):
            mods.append(calls[i + 1][1])
            vars_.append(_subtree(variables, calls[i + 1][0]))
            paths.append(calls[i + 1][0])
        units.append(
            Unit(
                "/".join(path[-2:]) if path[0] == "decoder" else path[-1],
                mods,
                vars_,
                in_shape[1:],
                out,
                _conv_flops(module, in_shape, out_shape) / in_shape[0],
                paths,
            )
        )
    return units


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


def _program(train: bool, precision: str, batch: int, cfg: Config, device: Any):
    """(call, compiled HLO text) of the whole student as users run it: the program
    `fan_jax.predict.Predictor` runs in `precision` (`jax_runners.predictor_program`), or
    `fan_jax.steps.train_step` as `fan_jax.train` runs it."""
    from benchmarks.jax_runners import JaxStudentTrainer, predictor_program

    size, L = cfg.image_size, cfg.num_landmarks
    if train:
        trainer = JaxStudentTrainer(L, batch, size, device=device)
        return (lambda: trainer.run(1)), trainer._step.as_text()
    return predictor_program(L, size, precision, batch, device)


def _unit_modules(unit: Unit) -> set[str]:
    return {path[-1] for path in unit.paths}


def profile_worker(args: Json) -> Json:
    """In a fresh process: {unit: ms per call} and the program's totals from one profile of
    the whole program (`benchmarks.op_profile`), the median over `repeats` traced rounds."""
    from benchmarks import op_profile

    cfg = Config(**args["cfg"])
    units = student_units(
        build_student(cfg.num_landmarks),
        init_variables(cfg.num_landmarks, cfg.image_size),
        (1, cfg.image_size, cfg.image_size, 3),
    )
    call, hlo = _program(args["train"], args["precision"], args["batch"], cfg, cpu_device())
    names = op_profile.op_names(hlo)
    calls = 3 if cfg.quick else 20
    ops, wall, traced = op_profile.median_profile(call, calls, cfg.repeats)
    per_unit, other = op_profile.attribute(
        ops, op_profile.fused_op_names(hlo), ((u.name, _unit_modules(u)) for u in units)
    )
    top_other = sorted(other.items(), key=lambda kv: -kv[1])[:8]
    return {
        "unit_ms": per_unit,
        "program": {
            "precision": args["precision"],
            "program_wall_ms": wall,
            # The same program inside the trace: the op times are scaled by wall / this.
            "traced_program_ms": traced,
            "ops_sum_ms": sum(ops.values()),
            "outside_units_ms": sum(other.values()),
            "outside_units_top": [
                {"op": op, "ms": ms, "op_name": names.get(op, "")} for op, ms in top_other
            ],
            "profile_calls_per_round": calls,
        },
    }


def profile_units(
    train: bool, precision: str, batch: int, cfg: Config
) -> tuple[dict[str, float], Json]:
    """`profile_worker` in its own process: the bf16 program (YNNPACK dots) runs ~30% slower
    beside float32 programs (XLA's dot emitter) in one process (`fan_jax.compiler`)."""
    args = {"cfg": dataclasses.asdict(cfg), "train": train, "precision": precision, "batch": batch}
    out = harness.run_in_process(
        "benchmarks.sections.layers",
        "profile_worker",
        args,
        f"layers profile ({precision}, train={train})",
        # Training runs under the CLI's malloc tunables (`fan_jax.allocator`); inference not.
        malloc="inherit" if train else "application",
    )
    return out["unit_ms"], out["program"]


def _mode(
    cfg: Config, units: list[Unit], train: bool, batch: int, peak: float, rates, precision: str
) -> Json:
    unit_ms, program = profile_units(train, precision, batch, cfg)
    rows = []
    total = dict.fromkeys(
        ("ms", "compute_bound_ms", "memory_bound_ms", "bound_ms", "flops", "bytes"), 0.0
    )
    for i, u in enumerate(units):
        first = i == 0 and u.in_shape[-1] == 3
        ms = max(unit_ms.get(u.name, 0.0), 1e-6)
        nbytes, flops = _traffic_and_flops(u, batch, train, first)
        compute, memory = 1e3 * flops / peak, 1e3 * nbytes / _rate_at(rates, nbytes)
        bound = max(compute, memory)
        rows.append(
            {
                "layer": u.name,
                "kind": u.kind,
                "in_shape": [batch, *u.in_shape],
                "out_shape": [batch, *u.out_shape[1:]],
                "ms": ms,
                "flops": flops,
                "bytes": nbytes,
                "compute_bound_ms": compute,
                "memory_bound_ms": memory,
                "bound": "compute" if compute >= memory else "memory",
                "fraction_of_bound": bound / ms,
            }
        )
        for k, v in (
            ("ms", ms),
            ("compute_bound_ms", compute),
            ("memory_bound_ms", memory),
            ("bound_ms", bound),
            ("flops", flops),
            ("bytes", nbytes),
        ):
            total[k] += v
    total["fraction_of_bound"] = total["bound_ms"] / total["ms"]
    fractions = sorted(r["fraction_of_bound"] for r in rows)
    return {
        "batch": batch,
        "layers": rows,
        "total": total,
        **program,
        # The units plus what no unit claims (input handling, the loss and optimizer in
        # training) against the program's wall time: how much of it the profile accounts for.
        "units_ms_over_program_wall": total["ms"] / program["program_wall_ms"],
        "ops_ms_over_program_wall": program["ops_sum_ms"] / program["program_wall_ms"],
        "median_fraction_of_bound": fractions[len(fractions) // 2],
        "layers_within_80pct_of_bound": sum(f >= 0.8 for f in fractions),
        "layers_within_50pct_of_bound": sum(f >= 0.5 for f in fractions),
        "num_layers": len(rows),
    }


@section("layers")
def layers_section(cfg: Config) -> Json:
    """Each student layer (conv + BN + activation) inside one profile of the whole program, inference and train, against its FLOP and byte bounds."""
    device = cpu_device()
    size, L = cfg.image_size, cfg.num_landmarks
    peak_info = harness.CONSUMERS.get("matmul_peak") or matmul_peak(
        device, n=512 if cfg.quick else 2048, repeats=cfg.repeats
    )
    peak = peak_info["flops_per_s"]
    sizes = (1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26) if not cfg.quick else (1 << 18, 1 << 22)
    rates = streaming_rates(device, sizes, cfg.repeats)
    units = student_units(build_student(L), init_variables(L, size), (1, size, size, 3))
    out: Json = {
        "image_size": size,
        "matmul_peak_flops_per_s": peak,
        "streaming_rates": [{"bytes": s, "bytes_per_s": r} for s, r in rates],
    }
    from fan_jax import precision

    modes = [("inference", False, cfg.layers_infer_batch, "float32")]
    if precision.bf16_units():
        # The program `--precision bfloat16` runs (bf16 matmuls), bounds as float32's.
        modes.append(("inference_bf16", False, cfg.layers_infer_batch, "bfloat16"))
    modes.append(("train", True, cfg.layers_train_batch, "float32"))
    for mode, train, batch, prec in modes:
        out[mode] = _mode(cfg, units, train, batch, peak, rates, prec)
    rows = [
        (f"streaming read+write GB/s at {s / 2**20:.2g} MiB", fmt(r / 1e9), "", "", "")
        for s, r in rates
    ]
    for mode, *_ in modes:
        m = out[mode]
        rows.append(
            (
                f"{mode} (batch {m['batch']}): program wall ms vs its units' profiled ms "
                f"(+ {m['outside_units_ms']:.2f} ms outside units)",
                fmt(m["program_wall_ms"]),
                fmt(m["total"]["ms"]),
                fmt(m["units_ms_over_program_wall"], "x"),
                "",
            )
        )
        rows.append(
            (
                f"{mode} units: profiled ms vs sum of bounds "
                f"({m['layers_within_80pct_of_bound']}/{m['num_layers']} units within 80%)",
                fmt(m["total"]["ms"]),
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
                    fmt(r["ms"]),
                    fmt(max(r["compute_bound_ms"], r["memory_bound_ms"])),
                    fmt(r["fraction_of_bound"]),
                    "",
                )
            )
    out["summary"] = {
        "layers_inference_fraction_of_bound": out["inference"]["total"]["fraction_of_bound"],
        "layers_train_fraction_of_bound": out["train"]["total"]["fraction_of_bound"],
        "layers_inference_units_over_wall": out["inference"]["units_ms_over_program_wall"],
    }
    if "inference_bf16" in out:
        out["summary"]["layers_inference_bf16_units_over_wall"] = out["inference_bf16"][
            "units_ms_over_program_wall"
        ]
    out["rows"] = rows
    return out
