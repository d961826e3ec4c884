"""Shared by the training tests: tiny in-memory datasets and configs, and a CLI worker.

The datasets are random-noise crops with random landmarks: enough to run the real grain
pipeline, the real steps and the real checkpointing, at a size that compiles and steps
in seconds. The CLI (`python tests/_train_helpers.py ...`) runs `train_and_evaluate` in a
fresh process, for tests that need their own JAX set-up (fake devices, several processes).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # for `from configs import default`


def tiny_encoder_cls():
    from flax import linen as nn

    class TinyEncoder(nn.Module):
        """Five stride-2 conv-BN-ReLU blocks: output stride 32 like the real encoders."""

        features: tuple[int, ...] = (8, 8, 16, 16, 16)

        @nn.compact
        def __call__(self, x, train: bool = False):
            for f in self.features:
                x = nn.Conv(f, (3, 3), strides=2, use_bias=False)(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
                x = nn.relu(x)
            return x

    return TinyEncoder


def tiny_fan(num_landmarks: int, decoder_channels: int = 8):
    """A FAN with the real decoder and head on a tiny encoder: compiles in seconds."""
    from fan_jax.models import fan
    from fan_jax.models.decoder import DeconvDecoder, HeatmapHead

    return fan.FAN(
        encoder=tiny_encoder_cls()(),
        decoder=DeconvDecoder(decoder_channels, kernel_size=2, num_layers=3),
        head=HeatmapHead(num_landmarks),
    )


def register_tiny_models() -> None:
    """Adds 'tiny_student' (8-channel taps) and 'tiny_teacher' (16) to the model registry."""
    import functools

    from fan_jax.models import fan

    fan.MODELS.setdefault("tiny_student", functools.partial(tiny_fan, decoder_channels=8))
    fan.MODELS.setdefault("tiny_teacher", functools.partial(tiny_fan, decoder_channels=16))


def tiny_regressor(num_landmarks: int, dropout_rate: float = 0.1, pool: str = "avg"):
    """The tiny encoder with the real regression head (KD-Loss roles)."""
    from fan_jax.models import regression

    return regression.LandmarkRegressor(
        tiny_encoder_cls()(features=(8, 16)),
        regression.RegressionHead(num_landmarks, dropout_rate, pool=pool),
    )


def register_tiny_regressor() -> None:
    """Adds 'tiny_reg' to the regressor registry."""
    from fan_jax.models import regression

    regression.REGRESSORS.setdefault("tiny_reg", tiny_regressor)


def fake_source(n: int, num_landmarks: int = 68, size: int = 80, seed: int = 0) -> list[dict]:
    """n examples in the TFDS feature layout (images decoded), landmarks inside the image."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lm = rng.uniform(0.25 * size, 0.75 * size, (num_landmarks, 2)).astype(np.float32)
        out.append(
            {
                "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                "landmarks": lm,
                "box": np.array(
                    [lm[:, 0].min(), lm[:, 1].min(), lm[:, 0].max(), lm[:, 1].max()], np.float32
                ),
                "to_original": np.array([[1, 0, 0], [0, 1, 0]], np.float32),
                "original_landmarks": lm.copy(),
                "file_name": f"img_{i:04d}.png",
            }
        )
    return out


def fake_sources(
    num_train: int = 16,
    num_test: int = 4,
    num_landmarks: int = 68,
    seed: int = 0,
    test_split: str = "full",
) -> dict[str, list[dict]]:
    return {
        "train": fake_source(num_train, num_landmarks, seed=seed),
        test_split: fake_source(num_test, num_landmarks, seed=seed + 1000),
    }


class SigtermOnRead:
    """A source that sends this process SIGTERM when example `at` is first read."""

    def __init__(self, source, at):
        self.source, self.at, self.sent = source, at, False

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if not self.sent and int(i) == self.at:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return self.source[i]


def load_config(name: str):
    """configs/<name>.py's get_config() (by path: names like 'wflw_mobilefan_0.5' are no
    module names)."""
    import importlib.util

    path = os.path.join(REPO_ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"config_{name.replace('.', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_names() -> list[str]:
    return sorted(
        f[:-3]
        for f in os.listdir(os.path.join(REPO_ROOT, "configs"))
        if f.endswith(".py") and not f.startswith("_")
    )


def tiny_config(name: str = "300w_mobilefan", **overrides):
    """A configs/<name>.py config at 64x64 input, batch 4, 3 steps, nothing periodic."""
    c = load_config(name)
    c.input_size = 64
    c.dataset.prepare = False
    c.train.batch_size = 4
    c.train.num_train_steps = 3
    c.train.log_every_steps = 1
    c.train.eval_every_steps = -1
    c.train.checkpoint_every_steps = 1
    c.train.keep_checkpoints = 10
    c.eval.batch_size = 4
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def tiny_student_workdir(workdir: str) -> str:
    """A tiny heatmap student trained 2 steps on noise into `workdir`: for tests of the CLI
    paths (predict, video), not of accuracy."""
    from fan_jax import train

    register_tiny_models()
    config = tiny_config(
        "300w_mobilefan", **{"model.name": "tiny_student", "train.num_train_steps": 2}
    )
    train.train_and_evaluate(config, workdir, sources=fake_sources(), evaluate_at_end=False)
    return workdir


def params_npz(state) -> dict[str, np.ndarray]:
    """Flat {path: array} of a TrainState's params and batch_stats (host copies)."""
    from flax import traverse_util

    out = {}
    for coll in ("params", "batch_stats"):
        for k, v in traverse_util.flatten_dict(getattr(state, coll)).items():
            out[coll + "/" + "/".join(k)] = np.asarray(v.addressable_data(0))
    return out


def main(argv: list[str]) -> None:
    """worker JSON_SPEC: {'config': name, 'overrides': {...}, 'workdir', 'out' (npz), 'jax': {...},
    'distributed': {'port', 'process_id', 'num_processes'} | None, 'sources': {...}}"""
    spec = json.loads(argv[1])
    import jax
    from absl import logging

    logging.set_verbosity(logging.INFO)

    for k, v in spec.get("jax", {}).items():
        jax.config.update(k, v)
    dist = spec.get("distributed")
    if dist:
        jax.distributed.initialize(
            f"localhost:{dist['port']}",
            num_processes=dist["num_processes"],
            process_id=dist["process_id"],
        )
    from fan_jax import train

    register_tiny_models()
    config = tiny_config(spec["config"], **spec.get("overrides", {}))
    result = train.train_and_evaluate(
        config,
        spec["workdir"],
        sources=fake_sources(**spec.get("sources", {})),
        evaluate_at_end=spec.get("evaluate", False),
    )
    if spec.get("out"):
        np.savez(spec["out"], step=result.step, **params_npz(result.state))
    print(f"RESULT step={result.step} preempted={result.preempted}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
