"""ImageNet init the way users run it: `--config.model.pretrained=FILE` through
`python -m fan_jax.main`, and bad weight files refused with a message naming the file.

The weight files are Keras `weights=None` models (random weights, so a mix-up of layers
shows), saved in the formats people download or write: legacy no-top HDF5 (the ImageNet
downloads' layout), Keras 3 `.weights.h5` and `.keras`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import jax
import keras
import numpy as np
import pytest
from flax import traverse_util

from fan_jax import checkpoints, pretrained, synthetic_300w
from fan_jax.models import fan
from fan_jax.tasks import heatmap as heatmap_task

sys.path.insert(0, os.path.dirname(__file__))
import _train_helpers as helpers


def _randomized(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if ws:
            layer.set_weights(
                [
                    rng.normal(0.0, 0.1, w.shape).astype(np.float32)
                    if "variance" not in v.path
                    else rng.uniform(0.5, 1.5, w.shape).astype(np.float32)
                    for w, v in zip(ws, layer.weights)
                ]
            )
    return model


def _mobilenet(alpha, include_top=False):
    return _randomized(
        keras.applications.MobileNetV2(
            weights=None,
            include_top=include_top,
            input_shape=(96, 96, 3) if not include_top else (224, 224, 3),
            alpha=alpha,
        ),
        seed=int(alpha * 10),
    )


def _save_legacy_h5(model, path):
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:  # the ImageNet downloads' layout: layer_names at the root
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return str(path)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    m10, m05 = _mobilenet(1.0), _mobilenet(0.5)
    files = {"mobilenet_v2_1.0.h5": _save_legacy_h5(m10, d / "mobilenet_v2_1.0_no_top.h5")}
    m05.save(d / "mobilenet_v2_0.5.keras")
    files["mobilenet_v2_0.5.keras"] = str(d / "mobilenet_v2_0.5.keras")
    m05.save_weights(d / "mobilenet_v2_0.5.weights.h5")
    files["mobilenet_v2_0.5.weights.h5"] = str(d / "mobilenet_v2_0.5.weights.h5")
    r50 = _randomized(
        keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3)),
        seed=50,
    )
    files["resnet50.h5"] = _save_legacy_h5(r50, d / "resnet50_notop.h5")
    return files


def _encoder_params(variables):
    return traverse_util.flatten_dict(variables["params"]["encoder"])


def _file_encoder_params(model, path):
    return traverse_util.flatten_dict(pretrained._load_encoder(model.encoder, path)["params"])


@pytest.mark.parametrize(
    "name,model_name,key",
    [
        ("300w_mobilefan", "mobilefan", "mobilenet_v2_1.0.h5"),
        ("300w_mobilefan_0.5", "mobilefan_0.5", "mobilenet_v2_1.0.h5"),
        ("300w_mobilefan", "mobilefan_w0.5", "mobilenet_v2_0.5.keras"),
        ("300w_mobilefan", "mobilefan_w0.5", "mobilenet_v2_0.5.weights.h5"),
        ("300w_teacher", "teacher", "resnet50.h5"),
    ],
)
def test_init_variables_loads_the_file(weight_files, name, model_name, key):
    """The code path `main` takes (train.init_variables) puts the file's weights in the encoder
    and leaves the decoder and head to their random init."""
    config = helpers.tiny_config(
        name, **{"model.pretrained": weight_files[key], "model.name": model_name}
    )
    model = fan.build_model(config.model.name, 68)
    params, batch_stats = heatmap_task.init_variables(config, model, None, jax.random.key(0))
    got = _encoder_params({"params": params["student"]})
    want = _file_encoder_params(model, weight_files[key])
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))
    stats = traverse_util.flatten_dict(batch_stats["student"]["encoder"])
    file_stats = traverse_util.flatten_dict(
        pretrained._load_encoder(model.encoder, weight_files[key])["batch_stats"]
    )
    for k in file_stats:
        np.testing.assert_array_equal(np.asarray(stats[k]), np.asarray(file_stats[k]))
    scratch, _ = heatmap_task.init_variables(
        helpers.tiny_config(name, **{"model.name": model_name}), model, None, jax.random.key(0)
    )
    assert not np.array_equal(
        np.asarray(got[next(iter(want))]),
        np.asarray(_encoder_params({"params": scratch["student"]})[next(iter(want))]),
    )


def _main(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "fan_jax.main", *args],
        capture_output=True,
        text=True,
        cwd=helpers.REPO_ROOT,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_300w(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic_300w")
    synthetic_300w.write_300w_tree(str(d / "manual"), num_train=8, num_test=4, size=96)
    return str(d / "manual"), str(d / "tfds")


def _cli_args(config, manual, tfds_dir, workdir, weights, **extra):
    args = [
        f"--config=configs/{config}.py",
        f"--workdir={workdir}",
        f"--config.model.pretrained={weights}",
        f"--config.dataset.manual_dir={manual}",
        f"--config.dataset.data_dir={tfds_dir}",
        "--config.input_size=64",
        "--config.train.batch_size=2",
        "--config.train.num_train_steps=1",
        "--config.train.eval_every_steps=-1",
        "--config.train.checkpoint_every_steps=1",
        "--config.eval.flip_test=False",
        "--config.eval.splits=('common',)",
    ]
    return args + [f"--config.{k}={v}" for k, v in extra.items()]


def test_cli_trains_from_a_keras_weight_file(weight_files, tiny_300w, tmp_path):
    """README path: python -m fan_jax.main ... --config.model.pretrained=FILE. With a zero
    learning rate the one step leaves the parameters where init put them, so the
    checkpoint's encoder must be the file's."""
    manual, tfds_dir = tiny_300w
    workdir = tmp_path / "run"
    weights = weight_files["mobilenet_v2_1.0.h5"]
    r = _main(
        *_cli_args(
            "300w_mobilefan_0.5", manual, tfds_dir, workdir, weights, **{"train.learning_rate": 0.0}
        )
    )
    assert r.returncode == 0, r.stderr[-4000:]
    restored, step = checkpoints.restore_model(str(workdir), "latest")
    assert step == 1
    model = fan.build_model("mobilefan_0.5", 68)
    got = _encoder_params({"params": restored["params"]["student"]})
    want = _file_encoder_params(model, weights)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))


# ------------------------------------------------------------------------- bad weight files


def _bad_file(kind, weight_files, tmp_path):
    if kind == "missing":
        return str(tmp_path / "nowhere" / "mobilenet_v2_1.0_no_top.h5"), "not found"
    if kind == "corrupt":
        path = tmp_path / "corrupt_no_top.h5"
        with open(weight_files["mobilenet_v2_1.0.h5"], "rb") as f:
            path.write_bytes(f.read()[:5000])
        return str(path), "not an HDF5 file"
    if kind == "garbage_keras":
        path = tmp_path / "garbage.keras"
        path.write_bytes(b"this is not a zip archive")
        return str(path), "not a loadable Keras model"
    if kind == "wrong_width":
        return weight_files["mobilenet_v2_0.5.keras"], r"width \(alpha\)|shape"
    if kind == "wrong_width_h5":
        path = _save_legacy_h5(_mobilenet(0.5), tmp_path / "mobilenet_v2_0.5_no_top.h5")
        return path, "MobileNetV2"
    if kind == "wrong_architecture":
        return weight_files["resnet50.h5"], "MobileNetV2"
    if kind == "with_top":
        path = _save_legacy_h5(_mobilenet(1.0, include_top=True), tmp_path / "with_top.h5")
        return path, "classifier"
    if kind == "with_top_keras":
        path = tmp_path / "with_top.keras"
        _mobilenet(1.0, include_top=True).save(path)
        return str(path), "classifier"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "corrupt",
        "garbage_keras",
        "wrong_width",
        "wrong_width_h5",
        "wrong_architecture",
        "with_top",
        "with_top_keras",
    ],
)
def test_bad_weight_file_is_named(weight_files, tmp_path, kind):
    path, expected = _bad_file(kind, weight_files, tmp_path)
    config = helpers.tiny_config("300w_mobilefan", **{"model.pretrained": path})
    model = fan.build_model("mobilefan", 68)
    with pytest.raises((pretrained.WeightFileError, FileNotFoundError)) as info:
        heatmap_task.init_variables(config, model, None, jax.random.key(0))
    message = str(info.value)
    assert path in message
    assert __import__("re").search(expected, message), message


def test_resnet_file_into_a_torchvision_style_teacher_is_named(weight_files):
    config = helpers.tiny_config(
        "300w_teacher", **{"model.pretrained": weight_files["resnet50.h5"]}
    )
    model = fan.build_model("resnet18_fan", 68)
    with pytest.raises(pretrained.WeightFileError, match="resnet50_notop.h5.*ResNet"):
        heatmap_task.init_variables(config, model, None, jax.random.key(0))


def test_cli_bad_weight_file_is_one_error_line(weight_files, tiny_300w, tmp_path):
    manual, tfds_dir = tiny_300w
    workdir = tmp_path / "run"
    r = _main(*_cli_args("300w_mobilefan", manual, tfds_dir, workdir, weight_files["resnet50.h5"]))
    assert r.returncode == 1, r.stderr[-4000:]
    assert f"ERROR: {weight_files['resnet50.h5']}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(workdir / "checkpoints") or not os.listdir(workdir / "checkpoints")
