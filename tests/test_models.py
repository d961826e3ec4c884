"""Model structure: shapes, taps, parameter counts, BatchNorm modes, and the fast encoder
against a plain-flax MobileNetV2 (grouped nn.Conv, nn.BatchNorm) with the same variables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fan_jax.models import (
    Adapters,
    DeconvDecoder,
    HeatmapHead,
    MobileNetV2Encoder,
    build_model,
    mobilefan,
    mobilenet_v2,
    teacher_channels,
)
from fan_jax.models.mobilenet_v2 import block_configs, make_divisible


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _random_variables(model, x, seed=0):
    """Variables of `model` filled with random values, without compiling `init`."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif name in ("bias", "mean"):
            value = rng.normal(0.0, 0.1, leaf.shape)
        else:
            value = rng.normal(0.0, 1.0, leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _abstract_init(model, size=256):
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    return variables, out


# --------------------------------------------------------------------------- structure


def test_keras_channel_rounding():
    # keras.applications.MobileNetV2 block output channels for alpha 1.0 and 0.5.
    assert [c["filters"] for c in block_configs(1.0)] == (
        [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
    )
    assert [c["filters"] for c in block_configs(0.5)] == (
        [8, 16, 16, 16, 16, 16, 32, 32, 32, 32, 48, 48, 48, 80, 80, 80, 160]
    )
    assert make_divisible(32 * 0.5) == 16 and make_divisible(32 * 0.35) == 16


def test_encoder_names_mirror_keras():
    variables, out = _abstract_init(MobileNetV2Encoder(), size=64)
    params = variables["params"]
    assert out.shape == (1, 2, 2, 320)
    assert {
        "Conv1",
        "bn_Conv1",
        "expanded_conv_depthwise",
        "expanded_conv_depthwise_BN",
        "expanded_conv_project",
        "expanded_conv_project_BN",
        "block_16_project_BN",
    } <= set(params)
    assert "expanded_conv_expand" not in params and "Conv_1" not in params
    for b in range(1, 17):
        for suffix in ("expand", "expand_BN", "depthwise", "depthwise_BN", "project", "project_BN"):
            assert f"block_{b}_{suffix}" in params
    assert params["block_1_expand"]["kernel"].shape == (1, 1, 16, 96)
    assert params["block_1_depthwise"]["kernel"].shape == (3, 3, 1, 96)
    assert set(variables["batch_stats"]["bn_Conv1"]) == {"mean", "var"}
    # Keras MobileNetV2(include_top=False) has 2,257,984 weights; Conv_1 and Conv_1_bn
    # (320*1280 + 4*1280) are cut off.
    assert _count(variables) == 2_257_984 - 320 * 1280 - 4 * 1280


@pytest.mark.parametrize(
    "name,channels,params_range",
    [
        ("mobilefan", 128, (1.9e6, 2.2e6)),
        ("mobilefan_0.5", 64, (1.75e6, 2.0e6)),
        ("teacher", 256, (33e6, 36e6)),
        ("resnet18_fan", 256, (14e6, 17e6)),
    ],
)
def test_model_shapes_taps_and_params(name, channels, params_range):
    model = build_model(name, 98)
    variables, (heatmaps, taps) = _abstract_init(model)
    assert heatmaps.shape == (1, 64, 64, 98)
    assert [t.shape for t in taps] == [
        (1, 16, 16, channels),
        (1, 32, 32, channels),
        (1, 64, 64, channels),
    ]
    assert teacher_channels(model) == (channels,) * 3
    assert params_range[0] <= _count(variables["params"]) <= params_range[1]
    assert set(variables["params"]) == {"encoder", "decoder", "head"}


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="mobilefan"):
        build_model("mobilefan_2", 98)


def test_decoder_init_and_teacher_geometry():
    x = jnp.ones((1, 4, 4, 8))
    dec = DeconvDecoder(32, kernel_size=4, num_layers=3)
    head = HeatmapHead(98)

    @jax.jit
    def run(x):
        v = dec.init(jax.random.key(0), x, train=False)
        out, taps = dec.apply(v, x, train=False)
        return v, out, taps, head.init(jax.random.key(1), out)["params"]["conv"]

    v, out, taps, head_params = run(x)
    assert out.shape == (1, 32, 32, 32) and len(taps) == 3
    np.testing.assert_array_equal(taps[-1], out)
    assert v["params"]["deconv_0"]["kernel"].shape == (4, 4, 8, 32)
    kernels = jnp.concatenate([v["params"][f"deconv_{i}"]["kernel"].ravel() for i in range(3)])
    assert abs(float(jnp.std(kernels)) - 0.001) < 1e-4
    assert abs(float(jnp.std(head_params["kernel"])) - 0.001) < 2e-4
    assert float(jnp.abs(head_params["bias"]).max()) == 0.0


@pytest.mark.parametrize("kind,has_bn", [("conv", False), ("conv_bn_relu", True)])
def test_adapters(kind, has_bn):
    taps = tuple(jnp.ones((2, s, s, 16)) for s in (2, 4, 8))
    adapters = Adapters((32, 32, 32), kind=kind)
    v = adapters.init(jax.random.key(0), taps, train=False)
    assert ("batch_stats" in v) == has_bn
    out, _ = adapters.apply(v, taps, train=True, mutable=["batch_stats"])
    assert [o.shape for o in out] == [(2, s, s, 32) for s in (2, 4, 8)]
    with pytest.raises(ValueError):
        Adapters((32,) * 3, kind="mlp").init(jax.random.key(0), taps)


# --------------------------------------------------------------------------- behaviour


def test_forward_and_batchnorm_train_vs_eval(monkeypatch):
    # A 5-block encoder with the real stride (32) and width (320): the BN behaviour does not
    # need all 17 blocks, and compiling them would dominate the test's time.
    monkeypatch.setattr(
        mobilenet_v2,
        "INVERTED_RESIDUAL_SETTING",
        ((1, 16, 1, 1), (6, 24, 1, 2), (6, 32, 1, 2), (6, 64, 1, 2), (6, 320, 1, 2)),
    )
    model = mobilefan(5, decoder_channels=16)
    images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3), minval=-1, maxval=1)
    variables = _random_variables(model, images)

    @jax.jit
    def run(v, x):
        (hm_train, _), updated = model.apply(v, x, train=True, mutable=["batch_stats"])
        hm_eval, taps = model.apply(v, x, train=False)
        hm_eval_one, _ = model.apply(v, x[:1], train=False)
        (hm_train_one, _), _ = model.apply(v, x[:1], train=True, mutable=["batch_stats"])
        return hm_train, updated, hm_eval, taps, hm_eval_one, hm_train_one

    hm_train, updated, hm_eval, taps, hm_eval_one, hm_train_one = run(variables, images)
    assert hm_eval.shape == hm_train.shape == (2, 16, 16, 5)
    assert [t.shape for t in taps] == [(2, 4, 4, 16), (2, 8, 8, 16), (2, 16, 16, 16)]
    assert all(bool(jnp.all(t >= 0)) for t in taps)  # post-ReLU
    assert bool(jnp.all(jnp.isfinite(hm_eval))) and bool(jnp.all(jnp.isfinite(hm_train)))
    old, new = variables["batch_stats"], updated["batch_stats"]
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old, new)
    assert all(jax.tree.leaves(changed))  # every running statistic moved in train mode
    # Running averages with momentum 0.9: new = 0.9 * old + 0.1 * batch statistic (biased var).
    conv1 = jax.lax.conv_general_dilated(
        images,
        variables["params"]["encoder"]["Conv1"]["kernel"],
        (2, 2),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    for stat, batch_value in (("mean", conv1.mean((0, 1, 2))), ("var", conv1.var((0, 1, 2)))):
        np.testing.assert_allclose(
            new["encoder"]["bn_Conv1"][stat],
            0.9 * old["encoder"]["bn_Conv1"][stat] + 0.1 * batch_value,
            rtol=1e-4,
            atol=1e-5,
        )
    # Eval mode uses running statistics: each image's output ignores the rest of the batch.
    np.testing.assert_allclose(hm_eval[:1], hm_eval_one, rtol=1e-4, atol=1e-6)
    # Train mode uses batch statistics: it does not, and it differs from eval mode.
    assert not np.allclose(hm_train[:1], hm_train_one, rtol=1e-3, atol=1e-6)
    assert not np.allclose(hm_train, hm_eval, rtol=1e-3, atol=1e-6)


# --------------------------------------------------------------------------- reference


class _ReferenceMobileNetV2(nn.Module):
    """MobileNetV2 with plain flax layers, the obviously-correct slow version."""

    width: float = 1.0

    @nn.compact
    def __call__(self, x, train=False):
        def bn(name):
            return nn.BatchNorm(
                use_running_average=not train, epsilon=1e-3, momentum=0.9, name=name
            )

        hi = jax.lax.Precision.HIGHEST
        x = nn.Conv(
            make_divisible(32 * self.width),
            (3, 3),
            2,
            padding="SAME",
            use_bias=False,
            precision=hi,
            name="Conv1",
        )(x)
        x = nn.relu6(bn("bn_Conv1")(x))
        for b, cfg in enumerate(block_configs(self.width)):
            inputs, cin = x, x.shape[-1]
            prefix = f"block_{b}_" if b else "expanded_conv_"
            if b:
                x = nn.Conv(
                    cin * cfg["expansion"],
                    (1, 1),
                    use_bias=False,
                    precision=hi,
                    name=prefix + "expand",
                )(x)
                x = nn.relu6(bn(prefix + "expand_BN")(x))
            x = nn.Conv(
                x.shape[-1],
                (3, 3),
                cfg["stride"],
                padding="SAME",
                use_bias=False,
                feature_group_count=x.shape[-1],
                precision=hi,
                name=prefix + "depthwise",
            )(x)
            x = nn.relu6(bn(prefix + "depthwise_BN")(x))
            x = nn.Conv(
                cfg["filters"], (1, 1), use_bias=False, precision=hi, name=prefix + "project"
            )(x)
            x = bn(prefix + "project_BN")(x)
            if cin == cfg["filters"] and cfg["stride"] == 1:
                x = x + inputs
        return x


def test_encoder_matches_plain_flax_reference(monkeypatch):
    # The first blocks cover every block kind (no expansion; stride 2; residual; stride 2 on
    # an odd size); the full 17-block stack is checked against Keras in test_pretrained.
    monkeypatch.setattr(
        mobilenet_v2, "INVERTED_RESIDUAL_SETTING", ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2))
    )
    x = jax.random.uniform(jax.random.key(1), (2, 24, 20, 3), minval=-1, maxval=1)
    fast, ref = MobileNetV2Encoder(width=1.0), _ReferenceMobileNetV2(width=1.0)
    variables = _random_variables(fast, x)
    assert jax.tree.structure(
        jax.eval_shape(lambda: ref.init(jax.random.key(0), x))
    ) == jax.tree.structure(variables)

    @jax.jit
    def run(variables, x):
        outs = []
        for m in (fast, ref):

            def loss(params, x, m=m):
                y, upd = m.apply(
                    {"params": params, "batch_stats": variables["batch_stats"]},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                return jnp.sum(jnp.sin(3 * y)), (y, upd["batch_stats"])

            (_, (y_train, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
                variables["params"], x
            )
            outs.append((m.apply(variables, x, train=False), y_train, stats, grads))
        return outs

    fast_out, ref_out = run(variables, x)
    assert fast_out[0].shape == (2, 3, 3, 32)
    for fast_group, ref_group in zip(fast_out, ref_out):
        # Some gradients are analytically zero (a BN bias whose shift a later train-mode BN
        # removes), so the tolerance is relative to the largest value of the group.
        scale = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(ref_group))
        for a, b in zip(jax.tree.leaves(fast_group), jax.tree.leaves(ref_group)):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)
