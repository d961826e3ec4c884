"""fan_jax benchmark report: ``python benchmarks/run.py [--json PATH] [--repeats N] [--quick] [--sections a,b]``.

Each section is a function registered with ``@section(name)`` that takes the run's ``Config``
and returns a JSON-able dict. A section may add:
  - ``"summary"``: headline numbers hoisted to the top level of the report (> 1 = ours faster);
  - ``"rows"``: table rows ``(metric, ours, baseline, ratio, spread)`` for the printed table
    (left out of the JSON).
To add a section, write one such function. Sections run in registration order; a train step's
images/s goes into ``CONSUMERS`` so the later ``pipeline`` section can size the input pipeline for it.

Timings are medians over ``--repeats`` after warm-up (which includes compilation), with
``block_until_ready`` / synchronous PyTorch calls. Competing measurements are interleaved
(A B A B ...) so load from other processes on a shared machine hits both alike. The fan_jax
models get host-filled random weights (``init_variables``), not ``model.init``, whose compile
takes minutes on a small CPU; speed does not depend on the values.
PyTorch is optional (``pip install fan_jax[bench]``): without it the torch columns are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

if __package__ in (None, ""):
    # Run as a script: make `benchmarks.torch_mobilefan` importable from a checkout.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

Json = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Configuration and registry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """What to measure; ``Config.quick_config()`` is the smoke-test variant (tiny shapes, few repeats)."""

    repeats: int = 5
    warmup: int = 1
    num_landmarks: int = 98
    train_batch: int = 8
    image_size: int = 256
    train_steps_per_repeat: int = 2
    infer_iters_per_repeat: int = 10
    fs_batch: int = 8
    fs_size: int = 64  # the largest (64x64) tap
    fs_student_channels: int = 128
    fs_teacher_channels: int = 256
    fs_direct_repeats: int = 3  # the N x N form takes seconds per call on a small CPU
    torch_format: str = "auto"  # 'auto' | 'contiguous' | 'channels_last'
    # None: probe the core count and 1 thread, keep the faster. OpenMP's barriers collapse when
    # a shared machine deschedules one of torch's threads (10x slower at load > cores), while
    # one thread does not; probing keeps the baseline fair to torch under either condition.
    torch_threads: int | None = None
    accel_train_batches: tuple[int, ...] = (1, 8, 256)
    accel_infer_batches: tuple[int, ...] = (1, 256)
    accel_steps_per_repeat: int = 5  # accelerator steps are ms: more per repeat beats timer/dispatch noise
    accel_iters_per_repeat: int = 20
    force_accelerator: bool = False  # run the accelerator section even on CPU
    pipeline_workers: tuple[int, ...] = (0, 1, 2)  # 0: grain's map in this process
    pipeline_examples: int = 64  # distinct synthetic faces in the in-memory source
    pipeline_face_size: int = 480  # rendered photo side: crops come out ~450 px, as 300W's (<= 512)
    pipeline_batch: int = 32
    pipeline_batches: int = 20  # timed batches per measurement (after 2 warm-up batches)
    pipeline_repeats: int = 2  # each measurement spawns its workers again (seconds of start-up)
    distill_student: str = "mobilefan"
    distill_teacher: str = "teacher"  # ResNet-50 FAN
    distill_repeats: int = 3  # the teacher makes a distill step seconds long on a small CPU
    distill_direct_repeats: int = 1  # N x N FS form: ~2x the Gram step's time and memory
    export_formats: tuple[str, ...] = ("tflite", "tflite_float16", "tflite_int8", "onnx")
    export_iters_per_repeat: int = 10
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> "Config":
        base = dict(
            repeats=2, warmup=1, train_batch=2, image_size=64, train_steps_per_repeat=1,
            infer_iters_per_repeat=2, fs_batch=2, fs_size=16, fs_direct_repeats=2,
            torch_format="contiguous", torch_threads=1, accel_train_batches=(2,), accel_infer_batches=(1, 2),
            accel_steps_per_repeat=1, accel_iters_per_repeat=2, pipeline_workers=(0, 1), pipeline_examples=4,
            pipeline_face_size=160, pipeline_batch=2, pipeline_batches=2, pipeline_repeats=1,
            distill_teacher="resnet18_fan", distill_repeats=1, distill_direct_repeats=1,
            export_formats=("tflite", "onnx"), export_iters_per_repeat=2, quick=True,
        )
        base.update(overrides)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    fn: Callable[[Config], Json]
    default: bool
    doc: str


SECTIONS: dict[str, Section] = {}


def section(name: str, default: bool = True) -> Callable[[Callable[[Config], Json]], Callable[[Config], Json]]:
    """Registers ``fn(config) -> dict`` as a report section, run in registration order."""

    def register(fn: Callable[[Config], Json]) -> Callable[[Config], Json]:
        if name in SECTIONS:
            raise ValueError(f"benchmark section {name!r} registered twice")
        SECTIONS[name] = Section(name, fn, default, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return fn

    return register


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     repeats_per_fn: dict[str, int] | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Wall time of each ``fn()`` (which must block until its work is done), interleaved A B A B.

    ``warmup`` untimed calls per function come first (compilation, allocator warm-up).
    ``repeats_per_fn`` lets an expensive function drop out of the rotation early.
    """
    counts = {name: (repeats_per_fn or {}).get(name, repeats) for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max(counts.values(), default=0)):
        for name, fn in fns.items():
            if r < counts[name]:
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    return times


def summarize(times: list[float], work: float = 1.0) -> Json:
    """Median and spread of repeat times; ``work`` items per repeat gives a rate (items/s)."""
    if not times:
        raise ValueError("no timings to summarise")
    median = statistics.median(times)
    return {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "spread": (max(times) - min(times)) / median if median > 0 else 0.0,  # (max-min)/median
        "repeats": len(times),
        "per_s": work / median if median > 0 else float("inf"),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def load_torch() -> Any | None:
    """The torch module, or None (with a message) when the optional extra is missing."""
    try:
        import torch
    except ImportError:
        print("torch not installed: skipping the PyTorch columns (pip install 'fan_jax[bench]')", file=sys.stderr)
        return None
    return torch


TORCH_MISSING = {"skipped": "torch not installed (pip install torch==2.13.0)"}


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# fan_jax side
# --------------------------------------------------------------------------------------------


def build_student(num_landmarks: int):
    """fan_jax MobileFAN (flax module)."""
    from fan_jax.models import build_model

    return build_model("mobilefan", num_landmarks)


def random_batch(batch: int, image_size: int, num_landmarks: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images [B, S, S, 3] ~ N(0, 1) (already normalised) and landmarks [B, L, 2] in crop pixels."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32)
    landmarks = rng.uniform(0, image_size - 1, (batch, num_landmarks, 2)).astype(np.float32)
    return images, landmarks


@functools.lru_cache(maxsize=None)
def variable_shapes(num_landmarks: int, image_size: int) -> Any:
    """The student's variables as ShapeDtypeStructs (tracing only; nothing compiles)."""
    import jax

    model = build_student(num_landmarks)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)


def init_variables(num_landmarks: int, image_size: int, seed: int = 0, device: Any = None) -> Json:
    """Variables of the model's shapes, filled on the host: kernels LeCun-normal, biases 0, BN identity.

    ``model.init`` costs minutes of XLA compile on a small CPU (eagerly, each op compiles on its
    own; under jit, the random initialisers make a large program), and timings do not depend on
    the exact initialiser, only on finite, normal-range values (no NaN, no denormals).
    """
    return fill_variables(variable_shapes(num_landmarks, image_size), seed, device)


def fill_variables(shapes: Any, seed: int = 0, device: Any = None) -> Json:
    """Host-filled variables of any flax ShapeDtypeStruct tree (see ``init_variables``)."""
    import jax

    rng = np.random.default_rng(seed)

    def fill(path: tuple, leaf: Any) -> np.ndarray:
        name = getattr(path[-1], "key", str(path[-1]))
        shape, dtype = leaf.shape, leaf.dtype
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1])) or 1
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)
        if name in ("scale", "var"):
            return np.ones(shape, dtype)
        return np.zeros(shape, dtype)  # bias, mean

    return jax.device_put(jax.tree_util.tree_map_with_path(fill, shapes), device)


@functools.lru_cache(maxsize=None)
def jitted_train_step(num_landmarks: int, lr: float = 1e-3) -> tuple[Callable, Any]:
    """(step, optimizer): the project's own `fan_jax.steps.train_step` for MobileFAN, jitted
    with the state donated, as `fan_jax.train` runs it (compiling takes minutes, so shared).

    step(state, batch, rng) -> (state, metrics): Gaussian targets rendered from the
    landmarks on device, heatmap MSE, Adam.
    """
    import jax
    import optax

    from fan_jax import steps

    tx = optax.adam(lr)
    step = functools.partial(steps.train_step, model=build_student(num_landmarks), tx=tx,
                             sigma=1.0)
    return jax.jit(step, donate_argnums=(0,)), tx


@functools.lru_cache(maxsize=None)
def jitted_predict(num_landmarks: int) -> Callable:
    """predict(variables, images) -> heatmaps, eval mode, jitted."""
    import jax

    model = build_student(num_landmarks)
    return jax.jit(lambda v, x: model.apply(v, x, train=False)[0])


_COMPILED: dict[tuple, Any] = {}


def compile_once(key: tuple, jitted: Callable, *args: Any) -> tuple[Any, float]:
    """(executable, compile seconds; 0 when cached): ahead-of-time ``jitted.lower(*args).compile()``.

    Calling the executable, not the jitted function, guarantees that no compile lands inside a
    timed repeat (jit re-lowered the train step once after its first call here, for state
    from ``init_variables``), and gives the compile time on its own.
    """
    if key not in _COMPILED:
        t0 = time.perf_counter()
        _COMPILED[key] = (jitted.lower(*args).compile(), time.perf_counter() - t0)
        return _COMPILED[key]
    return _COMPILED[key][0], 0.0


class JaxStudentTrainer:
    """Runs ``jitted_train_step`` on a fixed random batch, threading the (donated) state.

    ``device`` (default: JAX's default device) holds the data, so the step runs there.
    """

    def __init__(self, num_landmarks: int, batch: int, image_size: int, seed: int = 0, lr: float = 1e-3,
                 device: Any = None):
        import jax

        from fan_jax import steps

        step, tx = jitted_train_step(num_landmarks, lr)
        images, landmarks = random_batch(batch, image_size, num_landmarks, seed)
        self.batch = {"image": jax.device_put(images, device),
                      "landmarks": jax.device_put(landmarks, device)}
        self.rng = jax.device_put(jax.random.key(seed), device)
        variables = init_variables(num_landmarks, image_size, seed, device)
        self.state = jax.jit(functools.partial(steps.create_train_state, tx=tx))(
            {"student": variables["params"]}, {"student": variables["batch_stats"]})
        key = ("train", num_landmarks, batch, image_size, lr, str(device))
        self._step, self.compile_s = compile_once(key, step, self.state, self.batch, self.rng)
        self.loss = None

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.state, metrics = self._step(self.state, self.batch, self.rng)
            self.loss = metrics["loss"]
        self.loss.block_until_ready()


class JaxStudentPredictor:
    """Runs ``jitted_predict`` on a fixed random batch."""

    def __init__(self, num_landmarks: int, batch: int, image_size: int, seed: int = 0, device: Any = None):
        import jax

        images, _ = random_batch(batch, image_size, num_landmarks, seed)
        self.images = jax.device_put(images, device)
        self.variables = init_variables(num_landmarks, image_size, seed, device)
        key = ("predict", num_landmarks, batch, image_size, str(device))
        self._predict, self.compile_s = compile_once(key, jitted_predict(num_landmarks), self.variables,
                                                     self.images)

    def run(self, iters: int) -> None:
        for _ in range(iters):
            out = self._predict(self.variables, self.images)
        out.block_until_ready()


# --------------------------------------------------------------------------------------------
# PyTorch side
# --------------------------------------------------------------------------------------------


def torch_thread_candidates(cfg: Config) -> tuple[int, ...]:
    """Thread counts to try: the configured one, else one per core (as XLA uses) and 1."""
    if cfg.torch_threads is not None:
        return (cfg.torch_threads,)
    return tuple(dict.fromkeys((core_count(), 1)))


@functools.lru_cache(maxsize=None)
def pick_torch_threads(candidates: tuple[int, ...], num_landmarks: int, image_size: int) -> tuple[int, Json]:
    """(threads, median forward seconds per candidate): a cheap batch-1 forward probe, once per run.

    Thread scaling is a property of the machine's current load more than of the workload, and
    a slow candidate costs seconds per train step, so the sections share this probe.
    """
    torch = load_torch()
    if len(candidates) == 1 or torch is None:
        return candidates[0], {}
    runners = {str(t): TorchStudentPredictor(torch, num_landmarks, 1, image_size, "contiguous", t) for t in candidates}
    times = time_interleaved({k: (lambda r=r: r.run(1)) for k, r in runners.items()}, repeats=3, warmup=1)
    probe = {k: statistics.median(v) for k, v in times.items()}
    return int(min(probe, key=probe.get)), probe


class TorchStudentTrainer:
    """Eager MobileFAN train step mirroring JaxStudentTrainer (targets rendered inside the step)."""

    def __init__(self, torch: Any, num_landmarks: int, batch: int, image_size: int, memory_format: str,
                 threads: int, seed: int = 0, lr: float = 1e-3):
        from benchmarks import torch_mobilefan

        self.torch, self.tm, self.threads = torch, torch_mobilefan, threads
        torch.manual_seed(seed)
        fmt = _torch_memory_format(torch, memory_format)
        self.model = torch_mobilefan.TorchMobileFAN(num_landmarks).to(memory_format=fmt).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        images, landmarks = random_batch(batch, image_size, num_landmarks, seed)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
        self.landmarks = torch.from_numpy(landmarks)
        self.heatmap_size = image_size // 4

    def run(self, steps: int) -> None:
        torch = self.torch
        torch.set_num_threads(self.threads)
        for _ in range(steps):
            targets = self.tm.render_gaussians((self.landmarks + 0.5) / 4 - 0.5, self.heatmap_size, 1.0)
            self.opt.zero_grad(set_to_none=True)
            heatmaps, _ = self.model(self.images)
            loss = torch.nn.functional.mse_loss(heatmaps, targets)
            loss.backward()
            self.opt.step()
        self.loss = float(loss.detach())


class TorchStudentPredictor:
    def __init__(self, torch: Any, num_landmarks: int, batch: int, image_size: int, memory_format: str,
                 threads: int, seed: int = 0):
        from benchmarks import torch_mobilefan

        self.torch, self.threads = torch, threads
        torch.manual_seed(seed)
        fmt = _torch_memory_format(torch, memory_format)
        self.model = torch_mobilefan.TorchMobileFAN(num_landmarks).to(memory_format=fmt).eval()
        images, _ = random_batch(batch, image_size, num_landmarks, seed)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=fmt)

    def run(self, iters: int) -> None:
        self.torch.set_num_threads(self.threads)
        with self.torch.inference_mode():
            for _ in range(iters):
                self.model(self.images)


def _torch_memory_format(torch: Any, name: str) -> Any:
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    if name not in formats:
        raise ValueError(f"unknown torch memory format {name!r}; expected one of {sorted(formats)}")
    return formats[name]


def pick_torch_runner(cfg: Config, make: Callable[[str, int], Any], units: int) -> tuple[Any, Json]:
    """The fastest PyTorch runner: thread count from ``pick_torch_threads``, then the faster
    memory format when cfg.torch_format is 'auto'.

    Returns (runner, info) with the chosen 'torch_memory_format', 'torch_threads' and the
    probes' median times ('torch_threads_probe_s', 'torch_format_probe_s').
    """
    threads, thread_probe = pick_torch_threads(torch_thread_candidates(cfg), cfg.num_landmarks, cfg.image_size)
    formats = ("contiguous", "channels_last") if cfg.torch_format == "auto" else (cfg.torch_format,)
    runners = {fmt: make(fmt, threads) for fmt in formats}
    info: Json = {"torch_threads": threads, "torch_version": _version("torch")}
    if thread_probe:
        info["torch_threads_probe_s"] = thread_probe
    if len(runners) > 1:
        times = time_interleaved({k: (lambda r=r: r.run(units)) for k, r in runners.items()}, repeats=1, warmup=1)
        info["torch_format_probe_s"] = {k: statistics.median(t) for k, t in times.items()}
        best = min(info["torch_format_probe_s"], key=info["torch_format_probe_s"].get)
    else:
        best = formats[0]
    info["torch_memory_format"] = best
    return runners[best], info


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


# Train-step images/s measured by earlier sections of this process (sections run in order), so
# the pipeline section can say how many input cores each step needs: {name: {"images_per_s", ...}}.
CONSUMERS: dict[str, Json] = {}


def _fmt(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}{unit}"


@section("machine")
def machine_section(cfg: Config) -> Json:
    """Machine and library versions."""
    import jax

    info = {
        "cpu_count": os.cpu_count(),
        "cores_available": core_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "torch": _version("torch"),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }
    return info


def cpu_device() -> Any:
    """The CPU device: the PyTorch comparisons run both frameworks on the host CPU even when
    an accelerator is present (the accelerator has its own section)."""
    import jax

    return jax.devices("cpu")[0]


@section("train")
def train_section(cfg: Config) -> Json:
    """Student train step images/s on the CPU: fan_jax (jit) vs PyTorch eager."""
    b, size, L = cfg.train_batch, cfg.image_size, cfg.num_landmarks
    steps = cfg.train_steps_per_repeat
    out: Json = {"batch": b, "image_size": size, "num_landmarks": L, "steps_per_repeat": steps}
    ours = JaxStudentTrainer(L, b, size, device=cpu_device())
    fns = {"fan_jax": lambda: ours.run(steps)}
    torch = load_torch()
    if torch is not None:
        theirs, info = pick_torch_runner(cfg, lambda f, t: TorchStudentTrainer(torch, L, b, size, f, t), 1)
        out.update(info)
        fns["torch"] = lambda: theirs.run(steps)
    times = time_interleaved(fns, cfg.repeats, cfg.warmup)
    out["fan_jax"] = summarize(times["fan_jax"], work=b * steps)
    out["fan_jax"]["final_loss"] = float(ours.loss)
    out["fan_jax"]["compile_s"] = ours.compile_s
    speedup = None
    if torch is not None:
        out["torch"] = summarize(times["torch"], work=b * steps)
        out["torch"]["final_loss"] = theirs.loss
        speedup = ratio(out["fan_jax"]["per_s"], out["torch"]["per_s"])
    else:
        out["torch"] = TORCH_MISSING
    CONSUMERS["train"] = {"images_per_s": out["fan_jax"]["per_s"], "batch": b, "image_size": size,
                          "step": "CPU student train step (train section)"}
    out["summary"] = {"train_speedup_vs_torch": speedup}
    out["rows"] = [(f"train images/s (batch {b}, {size}px)", _fmt(out["fan_jax"]["per_s"]),
                    _fmt(out["torch"].get("per_s")), _fmt(speedup, "x"),
                    _spread(out["fan_jax"], out["torch"]))]
    return out


@section("inference")
def inference_section(cfg: Config) -> Json:
    """Student eval-mode latency at batch 1 on the CPU: fan_jax (jit) vs PyTorch eager (inference_mode)."""
    size, L, iters = cfg.image_size, cfg.num_landmarks, cfg.infer_iters_per_repeat
    out: Json = {"batch": 1, "image_size": size, "iters_per_repeat": iters}
    ours = JaxStudentPredictor(L, 1, size, device=cpu_device())
    fns = {"fan_jax": lambda: ours.run(iters)}
    torch = load_torch()
    if torch is not None:
        theirs, info = pick_torch_runner(cfg, lambda f, t: TorchStudentPredictor(torch, L, 1, size, f, t),
                                         max(1, iters // 4))
        out.update(info)
        fns["torch"] = lambda: theirs.run(iters)
    times = time_interleaved(fns, cfg.repeats, cfg.warmup)
    for name in fns:
        s = summarize(times[name], work=iters)
        s["latency_ms"] = 1e3 * s["median_s"] / iters
        out[name] = s
    out["fan_jax"]["compile_s"] = ours.compile_s
    speedup = None
    if torch is not None:
        speedup = ratio(out["torch"]["latency_ms"], out["fan_jax"]["latency_ms"])
    else:
        out["torch"] = TORCH_MISSING
    out["summary"] = {"inference_speedup_vs_torch": speedup}
    out["rows"] = [(f"inference latency ms (batch 1, {size}px)", _fmt(out["fan_jax"]["latency_ms"]),
                    _fmt(out["torch"].get("latency_ms")), _fmt(speedup, "x"),
                    _spread(out["fan_jax"], out["torch"]))]
    return out


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
    out: Json = {"batch": b, "size": n, "student_channels": cs, "teacher_channels": ct,
                 "device": str(jax.devices()[0])}
    compiled, values = {}, {}
    for name, loss in (("direct", feature_similarity_direct), ("gram", feature_similarity_gram)):
        fn = jax.jit(jax.value_and_grad(loss))
        compiled[name] = fn.lower(student, teacher).compile()
        mem = compiled[name].memory_analysis()
        out[name] = {"temp_bytes": _bytes_field(mem, "temp_size_in_bytes"),
                     "argument_bytes": _bytes_field(mem, "argument_size_in_bytes"),
                     "output_bytes": _bytes_field(mem, "output_size_in_bytes")}

    def call(name: str) -> Callable[[], None]:
        def run() -> None:
            value, grad = compiled[name](student, teacher)
            grad.block_until_ready()
            values[name] = float(value)
        return run

    times = time_interleaved({name: call(name) for name in compiled}, cfg.repeats, cfg.warmup,
                             repeats_per_fn={"direct": min(cfg.repeats, cfg.fs_direct_repeats)})
    for name in compiled:
        out[name].update(summarize(times[name]))
        out[name]["value"] = values[name]
    out["value_rel_diff"] = abs(values["gram"] - values["direct"]) / max(abs(values["direct"]), 1e-30)
    speedup = ratio(out["direct"]["median_s"], out["gram"]["median_s"])
    mem_ratio = ratio(out["direct"]["temp_bytes"], out["gram"]["temp_bytes"])
    out["summary"] = {"fs_gram_speedup": speedup, "fs_gram_memory_ratio": mem_ratio}
    label = f"FS loss fwd+grad (b{b}, {n}x{n}, {cs}/{ct} ch)"
    out["rows"] = [
        (f"{label} ms, gram vs direct", _fmt(1e3 * out["gram"]["median_s"]), _fmt(1e3 * out["direct"]["median_s"]),
         _fmt(speedup, "x"), _spread(out["gram"], out["direct"])),
        ("FS loss temp memory MiB, gram vs direct", _fmt(_mib(out["gram"]["temp_bytes"])),
         _fmt(_mib(out["direct"]["temp_bytes"])), _fmt(mem_ratio, "x"), ""),
    ]
    return out


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
        CONSUMERS["accelerator"] = {"images_per_s": s["per_s"], "batch": b, "image_size": size,
                                    "step": f"{backend} student train step (accelerator section, largest batch)"}
        rows.append((f"{backend} train images/s (batch {b})", _fmt(s["per_s"]), "", "", _spread(s)))
    for b in cfg.accel_infer_batches:
        predictor = JaxStudentPredictor(L, b, size, device=device)
        iters = cfg.accel_iters_per_repeat
        s = summarize(time_interleaved({"p": lambda: predictor.run(iters)}, cfg.repeats, cfg.warmup)["p"], b * iters)
        s["latency_ms"] = 1e3 * s["median_s"] / iters
        s["compile_s"] = predictor.compile_s
        out["inference"][str(b)] = s
        rows.append((f"{backend} inference images/s (batch {b})", _fmt(s["per_s"]), "", "", _spread(s)))
    out["rows"] = rows
    return out


# --------------------------------------------------------------------------------------------
# Distillation, input pipeline and exported models
# --------------------------------------------------------------------------------------------


def model_variables(model: Any, image_size: int, seed: int, device: Any = None) -> Json:
    """Host-filled variables of any FAN (see ``init_variables``): shapes by tracing, no compile."""
    import jax

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
    return fill_variables(shapes, seed, device)


class StepRunner:
    """Runs a ``fan_jax.steps`` step (AOT-compiled, state donated) on a fixed uint8 batch.

    ``step(state, *extra, batch, rng) -> (state, metrics)``; ``extra`` holds the frozen
    teacher variables of ``distill_step``.
    """

    def __init__(self, step: Callable, state: Any, extra: tuple, batch: Json):
        import jax

        self.state, self.extra, self.batch, self.rng = state, extra, batch, jax.random.key(0)
        # Lowered here, compiled by ``compile`` (callers may compile several in parallel).
        self.lowered = jax.jit(step, donate_argnums=(0,)).lower(state, *extra, batch, self.rng)
        self.compiled, self.compile_s, self.metrics, self.first_loss = None, None, None, None

    def compile(self) -> "StepRunner":
        t0 = time.perf_counter()
        self.compiled = self.lowered.compile()
        self.compile_s = time.perf_counter() - t0
        return self

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.state, self.metrics = self.compiled(self.state, *self.extra, self.batch, self.rng)
        self.metrics["loss"].block_until_ready()
        if self.first_loss is None:  # from the shared initial state: comparable across runners
            self.first_loss = float(self.metrics["loss"])

    def temp_bytes(self) -> int | None:
        return _bytes_field(self.compiled.memory_analysis(), "temp_size_in_bytes")


@section("distill")
def distill_section(cfg: Config) -> Json:
    """Distilled train step (student + frozen teacher, FA1-3 + FS1-3) images/s vs the plain student step."""
    import concurrent.futures

    import jax
    import optax

    from fan_jax import steps
    from fan_jax.models import fan

    b, size, L = cfg.train_batch, cfg.image_size, cfg.num_landmarks
    device = cpu_device()  # on the CPU, beside the train section's numbers
    student, teacher = fan.build_model(cfg.distill_student, L), fan.build_model(cfg.distill_teacher, L)
    adapters = fan.Adapters(features=fan.teacher_channels(teacher))  # the paper's 1x1 convs
    sv = model_variables(student, size, 0, device)
    tv = model_variables(teacher, size, 1, device)
    taps = jax.eval_shape(lambda v, x: student.apply(v, x)[1], sv,
                          jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
    av = fill_variables(jax.eval_shape(lambda t: adapters.init(jax.random.PRNGKey(0), t), taps), 2, device)
    rng = np.random.default_rng(0)
    # uint8 crops, as the input pipeline delivers them: normalisation is part of the step.
    batch = jax.device_put({"image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
                            "landmarks": rng.uniform(0, size - 1, (b, L, 2)).astype(np.float32)}, device)
    tx = optax.adam(1e-3)

    def state(with_adapters: bool) -> Any:
        params = {"student": sv["params"], **({"adapters": av["params"]} if with_adapters else {})}
        # Fresh copies: each runner donates (consumes) its own state.
        params = jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), device), params)
        bs = jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), device), {"student": sv["batch_stats"]})
        return steps.TrainState(step=jax.device_put(np.int32(0), device), params=params, batch_stats=bs,
                                opt_state=jax.jit(tx.init)(params))

    def distill(form: str) -> Callable:
        return functools.partial(steps.distill_step, model=student, adapters=adapters, teacher=teacher, tx=tx,
                                 fs_form=form)

    runners = {
        "plain": StepRunner(functools.partial(steps.train_step, model=student, tx=tx), state(False), (), batch),
        "distill_gram": StepRunner(distill("gram"), state(True), (tv,), batch),
        "distill_direct": StepRunner(distill("direct"), state(True), (tv,), batch),
    }
    # XLA's compile releases the GIL: two at a time overlap on two cores (~1 min each here).
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(2, core_count())) as pool:
        list(pool.map(StepRunner.compile, runners.values()))
    compile_wall_s = time.perf_counter() - t0
    repeats = min(cfg.repeats, cfg.distill_repeats)
    times = time_interleaved({k: (lambda r=r: r.run(1)) for k, r in runners.items()}, cfg.repeats, cfg.warmup,
                             repeats_per_fn={"distill_gram": repeats,
                                             "distill_direct": min(repeats, cfg.distill_direct_repeats)})
    out: Json = {"batch": b, "image_size": size, "num_landmarks": L, "student": cfg.distill_student,
                 "teacher": cfg.distill_teacher, "adapters": "conv", "terms": "FA1-3 + FS1-3", "lam": 1e-4,
                 "device": str(device), "compile_wall_s": compile_wall_s,
                 "repeats_note": f"distill steps: {repeats} repeats (direct form: "
                                 f"{min(repeats, cfg.distill_direct_repeats)}), plain step: {cfg.repeats}, "
                                 "to keep the section to minutes on a small CPU"}
    for name, r in runners.items():
        out[name] = summarize(times[name], work=b)
        out[name].update(compile_s=r.compile_s, temp_bytes=r.temp_bytes(), first_loss=r.first_loss,
                         final_loss=float(r.metrics["loss"]))
    gram, direct, plain = out["distill_gram"], out["distill_direct"], out["plain"]
    # Same initial state, teacher and batch: the two FS forms must compute the same first loss
    # (the final ones differ: the runners took different numbers of steps).
    out["loss_rel_diff_gram_vs_direct"] = abs(gram["first_loss"] - direct["first_loss"]) / max(
        abs(direct["first_loss"]), 1e-30)
    CONSUMERS["distill"] = {"images_per_s": gram["per_s"], "batch": b, "image_size": size,
                            "step": "CPU distilled train step, Gram FS (distill section)"}
    vs_plain = ratio(gram["per_s"], plain["per_s"])
    gram_speedup = ratio(gram["per_s"], direct["per_s"])
    out["summary"] = {"distill_images_per_s": gram["per_s"], "distill_speed_vs_plain_step": vs_plain,
                      "distill_gram_speedup_vs_direct": gram_speedup}
    label = f"(batch {b}, {size}px)"
    out["rows"] = [
        (f"distill step images/s {label}, vs plain student step", _fmt(gram["per_s"]), _fmt(plain["per_s"]),
         _fmt(vs_plain, "x"), _spread(gram, plain)),
        (f"distill step images/s {label}, Gram vs direct N x N FS", _fmt(gram["per_s"]), _fmt(direct["per_s"]),
         _fmt(gram_speedup, "x"), _spread(gram, direct)),
        ("distill step temp memory MiB, Gram vs direct FS", _fmt(_mib(gram["temp_bytes"])),
         _fmt(_mib(direct["temp_bytes"])), _fmt(ratio(direct["temp_bytes"], gram["temp_bytes"]), "x"), ""),
    ]
    return out


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
        out.append(common.make_example(img, lm, common.landmark_box(lm), f"synthetic/{i:04d}.jpg",
                                       subset="synthetic"))
    return out


@section("pipeline")
def pipeline_section(cfg: Config) -> Json:
    """grain train-pipeline images/s per worker count, and the input cores each train step needs."""
    from fan_jax import input_pipeline

    source = synthetic_source(cfg.pipeline_examples, cfg.pipeline_face_size)
    L = int(np.asarray(source[0]["landmarks"]).shape[0])
    augment = input_pipeline.AugmentConfig(output_size=cfg.image_size)
    cores = core_count()
    out: Json = {"image_size": cfg.image_size, "num_landmarks": L, "batch": cfg.pipeline_batch,
                 "batches_per_measurement": cfg.pipeline_batches, "source_examples": len(source),
                 "mean_stored_jpeg_bytes": float(np.mean([len(e["image"]) for e in source])),
                 "augment": dataclasses.asdict(augment), "threads_per_worker": 1, "workers": {}}
    # One thread per worker (and in-process): a worker is then one core, so cores used = workers.
    rates: dict[int, list[float]] = {w: [] for w in cfg.pipeline_workers}
    for _ in range(cfg.pipeline_repeats):  # interleaved, like time_interleaved
        for w in cfg.pipeline_workers:
            rates[w].append(input_pipeline.measure_throughput(
                source, num_workers=w, batch_size=cfg.pipeline_batch, num_batches=cfg.pipeline_batches,
                num_threads=1, augment=augment))
    rows = []
    for w, r in rates.items():
        s = summarize([1.0 / x for x in r])  # seconds per image: median / spread as elsewhere
        n = min(max(w, 1), cores)
        s.update(images_per_s=s.pop("per_s"), cores_used=n, ms_core_per_image=1e3 * n * s["median_s"])
        out["workers"][str(w)] = s
        what = "in-process" if w == 0 else f"{w} worker{'s' * (w > 1)}"
        rows.append((f"pipeline images/s ({what}, {cfg.image_size}px, {s['ms_core_per_image']:.2g} ms*core/image)",
                     _fmt(s["images_per_s"]), "", "", _spread(s)))
    # A worker's cost, IPC included: what each added training input core buys.
    per_core = out["workers"].get("1", next(iter(out["workers"].values())))["ms_core_per_image"]
    out["ms_core_per_image"] = per_core
    out["consumers"] = {}
    for name in ("train", "distill", "accelerator"):
        c = CONSUMERS.get(name)
        if c is None:
            out["consumers"][name] = "n/a (section not run in this report)"
            continue
        need = c["images_per_s"] * per_core / 1e3
        out["consumers"][name] = {**c, "pipeline_cores_needed": need}
        rows.append((f"pipeline cores to feed the {c['step']} at {c['images_per_s']:.3g} images/s",
                     _fmt(need), "", "", ""))
    if "train" not in CONSUMERS:
        rows.append(("pipeline cores to feed the CPU student train step", "n/a", "", "", ""))
    out["summary"] = {"pipeline_images_per_s_" + _workers_key(int(k)): v["images_per_s"]
                      for k, v in out["workers"].items()}
    out["rows"] = rows
    return out


def _workers_key(w: int) -> str:
    return "in_process" if w == 0 else f"{w}_worker" + "s" * (w > 1)


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
                     _fmt(s["latency_ms"]), _fmt(jax_stats["latency_ms"]), _fmt(speedup, "x"),
                     _spread(s, jax_stats)))
    res["rows"] = rows
    return res


def _spread(*stats: Json) -> str:
    return " / ".join(f"{100 * s['spread']:.0f}%" for s in stats if "spread" in s)


def _bytes_field(mem: Any, field: str) -> int | None:
    return None if mem is None else int(getattr(mem, field, 0))


def _mib(x: int | None) -> float | None:
    return None if x is None else x / 2**20


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def run_sections(cfg: Config, names: list[str] | None = None,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> tuple[Json, list]:
    """Runs the named sections (default: every default section) -> (report, table rows)."""
    names = [n for n, s in SECTIONS.items() if s.default] if names is None else names
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; available: {list(SECTIONS)}")
    report: Json = {"config": dataclasses.asdict(cfg), "sections": {}}
    rows: list = []
    for name in names:
        log(f"[benchmark] {name} ...")
        t0 = time.perf_counter()
        result = dict(SECTIONS[name].fn(cfg))
        result["section_wall_s"] = time.perf_counter() - t0
        report.update(result.pop("summary", {}))
        rows += result.pop("rows", [])
        report["sections"][name] = result
        log(f"[benchmark] {name} done in {result['section_wall_s']:.1f}s")
    # Headline numbers first, then machine and config, then the raw sections.
    ordered = {k: v for k, v in report.items() if k not in ("config", "sections")}
    if "machine" in report["sections"]:
        ordered["machine"] = report["sections"].pop("machine")
    ordered["config"], ordered["sections"] = report["config"], report["sections"]
    return ordered, rows


def format_table(rows: list) -> str:
    header = ("metric", "ours", "baseline", "ratio (>1: ours faster)", "spread (ours / baseline)")
    rows = [header] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="sections: " + ", ".join(f"{n} ({s.doc})" for n, s in SECTIONS.items()))
    p.add_argument("--json", default="out/benchmark.json", help="where to write the JSON report")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5; quick 2)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and repeats: a smoke test, not a measurement")
    p.add_argument("--sections", default=None,
                   help="comma-separated sections to run (default: all default ones); "
                        "naming 'accelerator' runs it on CPU too")
    p.add_argument("--torch-format", choices=("auto", "contiguous", "channels_last"), default=None,
                   help="PyTorch memory format; auto (default outside --quick) keeps the faster one")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch intra-op threads (default: probe the core count and 1, keep the faster)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Json:
    args = parse_args(argv)
    overrides: Json = {}
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.torch_format is not None:
        overrides["torch_format"] = args.torch_format
    if args.torch_threads is not None:
        overrides["torch_threads"] = args.torch_threads
    names = None
    if args.sections:
        names = [n.strip() for n in args.sections.split(",") if n.strip()]
        overrides["force_accelerator"] = "accelerator" in names
        if "machine" not in names:
            names.insert(0, "machine")
    cfg = Config.quick_config(**overrides) if args.quick else Config(**overrides)
    report, rows = run_sections(cfg, names)
    print(format_table(rows))
    headline = {k: v for k, v in report.items() if k not in ("config", "sections", "machine")}
    print(json.dumps(headline, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
