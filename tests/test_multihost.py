"""Two real JAX processes on localhost (gloo CPU collectives, 2 fake devices each) train a
tiny config through train_and_evaluate, each host reading its own shard through grain, and
end with the parameters of a single-process run over the same global batches."""

import functools
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from fan_jax import input_pipeline, optim, steps, train
from fan_jax.models import fan
from fan_jax.tasks import heatmap as heatmap_task

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers

helpers.register_tiny_models()

STEPS = 3
OVERRIDES = {
    "model.name": "tiny_student",
    "train.num_train_steps": STEPS,
    "train.batch_size": 8,
    "train.checkpoint_every_steps": 2,
}
SOURCES = {"num_train": 32, "num_test": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _single_process_reference() -> dict[str, np.ndarray]:
    """The same steps on one device, the global batch assembled from both hosts' shards."""
    config = helpers.tiny_config("300w_mobilefan", **OVERRIDES)
    sources = helpers.fake_sources(**SOURCES)
    model = fan.build_model("tiny_student", 68)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    params, batch_stats = heatmap_task.init_variables(config, model, None, init_rng)
    tx, _ = optim.make_optimizer(config, train.steps_per_epoch(config, len(sources["train"])))
    state = steps.create_train_state(params, batch_stats, tx)
    iters = [
        input_pipeline.train_iterator(
            sources["train"],
            68,
            seed=config.seed,
            global_batch_size=config.train.batch_size,
            augment=train.augment_settings(config),
            shard_index=i,
            shard_count=2,
        )
        for i in (0, 1)
    ]
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, sigma=config.sigma))
    for _ in range(STEPS):
        parts = [next(it) for it in iters]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "landmarks")}
        state, _ = step(state, batch, step_rng)
    return helpers.params_npz(state)


def test_two_processes_match_single_process(tmp_path):
    port = _free_port()
    workdir = str(tmp_path / "run")
    procs = []
    for pid in (0, 1):
        spec = {
            "config": "300w_mobilefan",
            "overrides": OVERRIDES,
            "workdir": workdir,
            "out": str(tmp_path / f"params_{pid}.npz"),
            "sources": SOURCES,
            "jax": {"jax_num_cpu_devices": 2, "jax_cpu_collectives_implementation": "gloo"},
            "distributed": {"port": port, "process_id": pid, "num_processes": 2},
        }
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        procs.append(
            subprocess.Popen(
                [sys.executable, helpers.__file__, json.dumps(spec)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=1200)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-6000:]
        assert f"RESULT step={STEPS}" in out, out[-3000:]
    assert "global batch 8 on 4 device(s), 2 host(s)" in outputs[0]
    # Each host checkpointed its own position in its own shard.
    for pid in (0, 1):
        assert os.path.exists(
            os.path.join(workdir, "checkpoints", str(STEPS), "data", f"process_{pid}-of-2.json")
        )
    got = [dict(np.load(tmp_path / f"params_{pid}.npz")) for pid in (0, 1)]
    expected = _single_process_reference()
    for k, v in expected.items():
        np.testing.assert_array_equal(got[0][k], got[1][k], err_msg=k)
        np.testing.assert_allclose(got[0][k], v, rtol=1e-4, atol=1e-6, err_msg=k)
