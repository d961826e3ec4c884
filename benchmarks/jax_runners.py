"""fan_jax runners for the speed sections: the student's variables, the project's own
jitted train step, inference, and a generic step runner."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.harness import Json, bytes_field, time_interleaved


def build_student(num_landmarks: int):
    """fan_jax MobileFAN (flax module)."""
    from fan_jax.models import build_model

    return build_model("mobilefan", num_landmarks)


def random_batch(
    batch: int, image_size: int, num_landmarks: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Images [B, S, S, 3] ~ N(0, 1) (already normalised) and landmarks [B, L, 2] in crop pixels."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32)
    landmarks = rng.uniform(0, image_size - 1, (batch, num_landmarks, 2)).astype(np.float32)
    return images, landmarks


@functools.cache
def variable_shapes(num_landmarks: int, image_size: int) -> Any:
    """The student's variables as ShapeDtypeStructs (tracing only; nothing compiles)."""
    import jax

    model = build_student(num_landmarks)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)


def predictor_program(
    num_landmarks: int, image_size: int, precision: str, batch: int = 1, device: Any = None
) -> tuple[Callable[[], Any], str]:
    """(call, compiled HLO text) of the program `fan_jax.predict.Predictor` runs in
    `precision`: uint8 crops in, landmarks out, the variables built in (random crops,
    already on the device)."""
    import jax

    from fan_jax import predict

    p = predict.Predictor(
        init_variables(num_landmarks, image_size),
        build_student(num_landmarks),
        num_landmarks,
        image_size,
        detector=lambda im: None,
    )
    p.set_precision(precision)
    rng = np.random.default_rng(0)
    crops = jax.device_put(
        rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8), device
    )
    exe = p._inference_fn().lower(crops).compile()
    return (lambda: jax.block_until_ready(exe(crops))), exe.as_text()


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


def traced_with(impl: str | None, fn: Callable) -> Callable:
    """`fn` traced under `layers.use_conv_impl(impl)` (None: the backend's default form)."""
    if impl is None:
        return fn
    from fan_jax.models import layers

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with layers.use_conv_impl(impl):
            return fn(*args, **kwargs)

    return wrapped


@functools.cache
def jitted_train_step(
    num_landmarks: int, lr: float = 1e-3, compute_dtype: str = "float32", impl: str | None = None
) -> tuple[Callable, Any]:
    """(step, optimizer): the project's own `fan_jax.steps.train_step` for MobileFAN, jitted
    with the state donated, as `fan_jax.train` runs it (compiling takes minutes, so shared).

    step(state, batch, rng) -> (state, metrics): Gaussian targets rendered from the
    landmarks on device, heatmap MSE, Adam. `impl`: the layers' conv form (None: default).
    """
    import jax
    import optax

    from fan_jax import compiler, steps

    tx = optax.adam(lr)
    step = functools.partial(
        steps.train_step,
        model=build_student(num_landmarks),
        tx=tx,
        sigma=1.0,
        compute_dtype=compute_dtype,
    )
    return jax.jit(
        traced_with(impl, step),
        donate_argnums=(0,),
        compiler_options=compiler.compiler_options("train"),
    ), tx


@functools.cache
def jitted_predict(
    num_landmarks: int,
    compute_dtype: str = "float32",
    impl: str | None = None,
    options: tuple | None = None,
) -> Callable:
    """predict(variables, images) -> heatmaps, eval mode, jitted (bf16: a bf16 copy of both).

    `options`: XLA compiler options as (name, value) pairs; None: fan_jax's own
    (`fan_jax.compiler`), () : XLA's defaults."""
    import jax

    from fan_jax import compiler, steps

    model = build_student(num_landmarks)
    dtype = steps.dtype_of(compute_dtype)

    def predict(v, x):
        return model.apply(steps.params_in(v, dtype), x.astype(dtype), train=False)[0]

    opts = compiler.compiler_options("predict") if options is None else dict(options) or None
    return jax.jit(traced_with(impl, predict), compiler_options=opts)


_COMPILED: dict[tuple, Any] = {}


def flops_of(compiled: Any) -> float | None:
    """XLA's FLOP count of one call of a compiled executable (None when it gives none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _matmul_rate(matmul: Callable[[], Any], n: int, dtype: str, repeats: int) -> Json:
    t = statistics.median(time_interleaved({"mm": matmul}, repeats, warmup=1)["mm"])
    return {"n": n, "dtype": dtype, "median_s": t, "flops_per_s": 2.0 * n**3 / t}


def matmul_peak(
    device: Any = None, dtype: str = "float32", n: int = 2048, repeats: int = 5
) -> Json:
    """This device's matmul rate: a jitted [n, n] @ [n, n] (2 n^3 FLOPs), median of `repeats`."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = jax.device_put(jnp.asarray(rng.standard_normal((n, n)), dtype), device)
    b = jax.device_put(jnp.asarray(rng.standard_normal((n, n)), dtype), device)
    f = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
    return _matmul_rate(lambda: f(a, b).block_until_ready(), n, dtype, repeats)


def numpy_matmul_peak(n: int = 2048, repeats: int = 5) -> Json:
    """numpy's BLAS float32 matmul rate, the same way."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    return _matmul_rate(lambda: a @ b, n, "float32", repeats)


def with_peak(s: Json, flops: float | None, calls: int, peak_flops_per_s: float | None) -> Json:
    """A timing summary `s` (`calls` calls per repeat) with XLA's FLOPs per call and the
    fraction of the matmul peak achieved (1.0: at the bound; None when either is unknown)."""
    s["flops_per_call"] = flops
    s["fraction_of_matmul_peak"] = None
    if flops and peak_flops_per_s and s["median_s"] > 0:
        s["fraction_of_matmul_peak"] = flops * calls / s["median_s"] / peak_flops_per_s
    return s


@dataclasses.dataclass
class DistillParts:
    """What a distilled step is built from: the networks, host-filled variables, a uint8 batch."""

    student: Any
    teacher: Any
    adapters: Any
    student_vars: Json
    teacher_vars: Json
    adapter_vars: Json
    batch: Json
    device: Any

    def state(self, tx: Any, with_adapters: bool = True) -> Any:
        """A fresh TrainState (each runner donates, i.e. consumes, its own)."""
        import jax

        from fan_jax import steps

        def put(t: Any) -> Any:
            return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), self.device), t)

        params = put(
            {
                "student": self.student_vars["params"],
                **({"adapters": self.adapter_vars["params"]} if with_adapters else {}),
            }
        )
        return steps.TrainState(
            step=jax.device_put(np.int32(0), self.device),
            params=params,
            batch_stats=put({"student": self.student_vars["batch_stats"]}),
            opt_state=jax.jit(tx.init)(params),
        )


def distill_parts(
    student: str, teacher: str, num_landmarks: int, batch: int, image_size: int, device: Any = None
) -> DistillParts:
    """Student, teacher and the paper's 1x1-conv adapters, with variables filled on the host
    (``init_variables``) and uint8 crops, as the input pipeline delivers them."""
    import jax

    from fan_jax.models import fan

    s, t = fan.build_model(student, num_landmarks), fan.build_model(teacher, num_landmarks)
    adapters = fan.Adapters(features=fan.teacher_channels(t))
    sv, tv = model_variables(s, image_size, 0, device), model_variables(t, image_size, 1, device)
    taps = jax.eval_shape(
        lambda v, x: s.apply(v, x)[1],
        sv,
        jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32),
    )
    av = fill_variables(
        jax.eval_shape(lambda x: adapters.init(jax.random.PRNGKey(0), x), taps), 2, device
    )
    rng = np.random.default_rng(0)
    data = jax.device_put(
        {
            "image": rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
            "landmarks": rng.uniform(0, image_size - 1, (batch, num_landmarks, 2)).astype(
                np.float32
            ),
        },
        device,
    )
    return DistillParts(s, t, adapters, sv, tv, av, data, device)


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

    def __init__(
        self,
        num_landmarks: int,
        batch: int,
        image_size: int,
        seed: int = 0,
        lr: float = 1e-3,
        device: Any = None,
        compute_dtype: str = "float32",
        impl: str | None = None,
    ):
        import jax

        from fan_jax import steps

        step, tx = jitted_train_step(num_landmarks, lr, compute_dtype, impl)
        images, landmarks = random_batch(batch, image_size, num_landmarks, seed)
        self.batch = {
            "image": jax.device_put(images, device),
            "landmarks": jax.device_put(landmarks, device),
        }
        self.rng = jax.device_put(jax.random.key(seed), device)
        variables = init_variables(num_landmarks, image_size, seed, device)
        self.state = jax.jit(functools.partial(steps.create_train_state, tx=tx))(
            {"student": variables["params"]}, {"student": variables["batch_stats"]}
        )
        key = ("train", num_landmarks, batch, image_size, lr, str(device), compute_dtype, impl)
        self._step, self.compile_s = compile_once(key, step, self.state, self.batch, self.rng)
        self.flops = flops_of(self._step)
        self.loss = None

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.state, metrics = self._step(self.state, self.batch, self.rng)
            self.loss = metrics["loss"]
        self.loss.block_until_ready()


class JaxStudentPredictor:
    """Runs ``jitted_predict`` on a fixed random batch."""

    def __init__(
        self,
        num_landmarks: int,
        batch: int,
        image_size: int,
        seed: int = 0,
        device: Any = None,
        compute_dtype: str = "float32",
        impl: str | None = None,
        options: tuple | None = None,
    ):
        import jax

        images, _ = random_batch(batch, image_size, num_landmarks, seed)
        self.images = jax.device_put(images, device)
        self.variables = init_variables(num_landmarks, image_size, seed, device)
        key = (
            "predict",
            num_landmarks,
            batch,
            image_size,
            str(device),
            compute_dtype,
            impl,
            options,
        )
        self._predict, self.compile_s = compile_once(
            key,
            jitted_predict(num_landmarks, compute_dtype, impl, options),
            self.variables,
            self.images,
        )
        self.flops = flops_of(self._predict)

    def run(self, iters: int) -> None:
        for _ in range(iters):
            out = self._predict(self.variables, self.images)
        out.block_until_ready()


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

    def compile(self) -> StepRunner:
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
        return bytes_field(self.compiled.memory_analysis(), "temp_size_in_bytes")
