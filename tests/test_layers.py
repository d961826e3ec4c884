"""The fast layers against the plain lax convolutions (and PyTorch's definition) they replace."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fan_jax.models.layers import (
    BatchNorm,
    ConvTranspose,
    DepthwiseConv,
    PatchConv,
    PointwiseConv,
    conv_transpose_torch,
    conv_transpose_torch_reference,
    depthwise_conv,
    same_padding,
)

HI = jax.lax.Precision.HIGHEST
TOL = dict(rtol=1e-5, atol=1e-5)


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _check_value_and_grads(fast, ref, x, kernel):
    """Values and gradients (wrt input and kernel) of `fast` and `ref` agree."""

    @jax.jit
    def value_and_grads(x, kernel, cot):
        outs = []
        for f in (fast, ref):
            y, vjp = jax.vjp(f, x, kernel)
            outs.append((y, *vjp(cot.astype(y.dtype))))
        return outs

    cot = _rand(99, jax.eval_shape(ref, x, kernel).shape)
    (yf, dxf, dkf), (yr, dxr, dkr) = value_and_grads(x, kernel, cot)
    np.testing.assert_allclose(yf, yr, **TOL)
    for a, b in ((dxf, dxr), (dkf, dkr)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _lax_conv(x, kernel, strides=1, padding="SAME", groups=1):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (strides, strides),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=HI,
    )


def test_same_padding_matches_keras_correct_pad():
    # Keras pads stride-2 3x3 convs (0, 1) on even sizes and (1, 1) on odd sizes.
    assert same_padding(8, 3, 2) == (0, 1)
    assert same_padding(7, 3, 2) == (1, 1)
    assert same_padding(8, 3, 1) == (1, 1)


@pytest.mark.parametrize("use_bias", [False, True])
def test_pointwise_conv_matches_nn_conv(use_bias):
    x = _rand(0, (2, 5, 7, 6))
    fast = PointwiseConv(4, use_bias=use_bias)
    ref = nn.Conv(4, (1, 1), use_bias=use_bias, precision=HI)
    v = fast.init(jax.random.key(1), x)
    v_ref = ref.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v_ref)
    if use_bias:
        v = {"params": {**v["params"], "bias": _rand(3, (4,))}}
    np.testing.assert_allclose(fast.apply(v, x), ref.apply(v, x), **TOL)


def test_pointwise_conv_grads():
    def fast(x, k):
        return PointwiseConv(k.shape[-1], precision=HI).apply({"params": {"kernel": k}}, x)

    _check_value_and_grads(fast, _lax_conv, _rand(0, (2, 5, 7, 6)), _rand(1, (1, 1, 6, 4)))


@pytest.mark.parametrize(
    "strides,size,padding",
    [
        (1, (6, 6), "SAME"),
        (1, (5, 7), "SAME"),
        (2, (8, 8), "SAME"),
        (2, (7, 9), "SAME"),
        (2, (8, 6), ((1, 1), (1, 1))),
        (1, (6, 5), "VALID"),
        (2, (9, 8), "VALID"),
    ],
)
def test_depthwise_conv_matches_grouped_conv(strides, size, padding):
    c = 5
    x = _rand(0, (2, *size, c))
    kernel = _rand(1, (3, 3, 1, c))
    _check_value_and_grads(
        lambda x, k: depthwise_conv(x, k, strides, padding),
        lambda x, k: _lax_conv(x, k, strides, padding, groups=c),
        x,
        kernel,
    )


def test_depthwise_module_params_match_nn_conv():
    x = _rand(0, (1, 8, 8, 6))
    v = DepthwiseConv(3, strides=2).init(jax.random.key(0), x)
    v_ref = nn.Conv(6, (3, 3), strides=2, feature_group_count=6, use_bias=False).init(
        jax.random.key(0), x
    )
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v_ref)
    ref = nn.Conv(
        6, (3, 3), strides=2, padding="SAME", feature_group_count=6, use_bias=False, precision=HI
    )
    np.testing.assert_allclose(DepthwiseConv(3, strides=2).apply(v, x), ref.apply(v, x), **TOL)


@pytest.mark.parametrize(
    "k,strides,size,padding",
    [
        (3, 2, (8, 8), "SAME"),
        (3, 2, (7, 9), "SAME"),
        (3, 1, (6, 5), "SAME"),
        (5, 2, (9, 8), "VALID"),
        (1, 1, (4, 4), "SAME"),
    ],
)
def test_patch_conv_matches_lax_conv(k, strides, size, padding):
    cin, cout = 3, 4
    x, kernel = _rand(0, (2, *size, cin)), _rand(1, (k, k, cin, cout))

    def fast(x, kernel):
        return PatchConv(cout, k, strides=strides, padding=padding, precision=HI).apply(
            {"params": {"kernel": kernel}}, x
        )

    _check_value_and_grads(fast, lambda x, kern: _lax_conv(x, kern, strides, padding), x, kernel)


def test_patch_conv_params_match_nn_conv():
    x = _rand(0, (1, 8, 8, 3))
    v = PatchConv(6, 3, strides=2, use_bias=True).init(jax.random.key(0), x)
    v_ref = nn.Conv(6, (3, 3), strides=2, padding="SAME", precision=HI).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v_ref)
    v = {"params": {**v["params"], "bias": _rand(3, (6,))}}
    ref = nn.Conv(6, (3, 3), strides=2, padding="SAME", precision=HI)
    np.testing.assert_allclose(
        PatchConv(6, 3, strides=2, use_bias=True, precision=HI).apply(v, x), ref.apply(v, x), **TOL
    )


def _torch_conv_transpose_loop(x, kernel, s, p, op=0):
    """PyTorch's ConvTranspose2d by definition: each input pixel scatters a k x k stamp."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    n, h, w, _ = x.shape
    k, _, _, cout = kernel.shape
    hf, wf = (h - 1) * s + k + op, (w - 1) * s + k + op
    full = np.zeros((n, hf + p, wf + p, cout))
    for i, j, a, b in itertools.product(range(h), range(w), range(k), range(k)):
        full[:, i * s + a, j * s + b] += x[:, i, j] @ kernel[a, b]
    return full[:, p : p + (h - 1) * s - 2 * p + k + op, p : p + (w - 1) * s - 2 * p + k + op]


@pytest.mark.parametrize(
    "k,s,p,op", [(2, 2, 0, 0), (4, 2, 1, 0), (3, 2, 1, 1), (4, 2, 0, 0), (6, 3, 2, 0)]
)
def test_conv_transpose_matches_torch_definition(k, s, p, op):
    x = _rand(0, (2, 3, 4, 5))
    kernel = _rand(1, (k, k, 5, 3))
    expected = _torch_conv_transpose_loop(x, kernel, s, p, op)
    np.testing.assert_allclose(
        conv_transpose_torch_reference(x, kernel, s, p, op, HI), expected, **TOL
    )
    np.testing.assert_allclose(conv_transpose_torch(x, kernel, s, p, op, HI), expected, **TOL)


@pytest.mark.parametrize("k,p", [(2, 0), (4, 1)])
def test_conv_transpose_grads(k, p):
    _check_value_and_grads(
        lambda x, w: conv_transpose_torch(x, w, 2, p, precision=HI),
        lambda x, w: conv_transpose_torch_reference(x, w, 2, p, precision=HI),
        _rand(0, (2, 4, 3, 6)),
        _rand(1, (k, k, 6, 5)),
    )


def test_conv_transpose_matches_pytorch():
    torch = pytest.importorskip("torch")
    x = _rand(0, (2, 4, 5, 6))
    for k, p in [(2, 0), (4, 1)]:
        layer = torch.nn.ConvTranspose2d(6, 3, k, 2, p, bias=True)
        with torch.no_grad():
            expected = layer(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        params = {
            "kernel": layer.weight.detach().numpy().transpose(2, 3, 0, 1),
            "bias": layer.bias.detach().numpy(),
        }
        ours = ConvTranspose(3, k, 2, torch_padding=p, use_bias=True, precision=HI).apply(
            {"params": params}, x
        )
        np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_conv_transpose_module_param_shape_matches_nn_conv_transpose():
    x = _rand(0, (1, 4, 4, 6))
    v = ConvTranspose(3, 4, 2, torch_padding=1).init(jax.random.key(0), x)
    v_ref = nn.ConvTranspose(3, (4, 4), (2, 2), use_bias=False).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v_ref)
    assert ConvTranspose(3, 4, 2, torch_padding=1).apply(v, x).shape == (1, 8, 8, 3)


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_batch_norm_matches_flax(activation):
    """Fused BatchNorm(+activation): values, gradients and running statistics of
    nn.BatchNorm followed by the activation, in train and eval mode."""
    act = {None: lambda y: y, "relu": nn.relu, "relu6": nn.relu6}[activation]
    x = _rand(0, (4, 5, 6, 7)) * 2 + 1
    cot = _rand(4, x.shape)
    ours = BatchNorm(momentum=0.9, epsilon=1e-3, activation=activation)
    ref = nn.BatchNorm(momentum=0.9, epsilon=1e-3)
    variables = ref.init(jax.random.key(1), x, use_running_average=False)
    assert jax.tree.map(
        jnp.shape, ours.init(jax.random.key(1), x, use_running_average=False)
    ) == jax.tree.map(jnp.shape, variables)
    params = {"scale": _rand(2, (7,)) + 2, "bias": _rand(3, (7,))}
    stats = {"mean": _rand(5, (7,)), "var": jnp.exp(_rand(6, (7,)))}

    @jax.jit
    def run(params, x):
        outs = []
        for module, f in ((ours, lambda y: y), (ref, act)):

            def loss(params, x, module=module, f=f):
                y, upd = module.apply(
                    {"params": params, "batch_stats": stats},
                    x,
                    use_running_average=False,
                    mutable=["batch_stats"],
                )
                return jnp.sum(f(y) * cot), upd

            (_, upd), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
            y_eval = module.apply(
                {"params": params, "batch_stats": stats}, x, use_running_average=True
            )
            outs.append((upd, grads, f(y_eval)))
        return outs

    fast, slow = run(params, x)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_lax_form_equals_the_matmul_form(monkeypatch):
    """conv_impl 'lax' (XLA's native convolutions) and 'matmul' give the same layers."""
    from fan_jax.models import layers

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = PatchConv(12, 3, strides=2)(x)
            x = PointwiseConv(24)(x)
            x = DepthwiseConv(3, strides=2)(x)
            x = DepthwiseConv(3, strides=1)(x)
            x = ConvTranspose(16, 4, strides=2, torch_padding=1)(x)
            return ConvTranspose(8, 2, strides=2)(x)

    model = Net()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x)

    def loss(p, impl):
        with layers.use_conv_impl(impl):
            y = model.apply(p, x)
        return jnp.sum(y**2), y

    (_l_m, y_m), g_m = jax.value_and_grad(loss, has_aux=True)(params, "matmul")
    (_l_l, y_l), g_l = jax.value_and_grad(loss, has_aux=True)(params, "lax")
    np.testing.assert_allclose(y_l, y_m, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_l), jax.tree.leaves(g_m)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    # They are different programs: only the lax one has convolutions.
    for impl, has_conv in (("lax", True), ("matmul", False)):
        with layers.use_conv_impl(impl):
            text = str(jax.make_jaxpr(lambda p: model.apply(p, x))(params))
        assert ("conv_general_dilated" in text) == has_conv, impl
    monkeypatch.setenv("FAN_JAX_CONV_IMPL", "cudnn")
    with pytest.raises(ValueError, match="FAN_JAX_CONV_IMPL"):
        layers.conv_impl()


def test_conv_impl_default_follows_the_backend(monkeypatch):
    """CONV_IMPL_DEFAULTS: XLA's native convolutions ('lax') on GPU and TPU, the matmul forms on
    the CPU; $FAN_JAX_CONV_IMPL and `use_conv_impl` win over the backend's default."""
    from fan_jax.models import layers

    monkeypatch.delenv("FAN_JAX_CONV_IMPL", raising=False)
    model = PointwiseConv(4)
    x = jnp.ones((1, 4, 4, 3), jnp.float32)
    params = model.init(jax.random.key(0), x)
    for backend, want in (("cpu", "matmul"), ("gpu", "lax"), ("tpu", "lax")):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert layers.conv_impl() == want, backend
        text = str(jax.make_jaxpr(lambda p: model.apply(p, x))(params))
        assert ("conv_general_dilated" in text) == (want == "lax"), backend
        other = "matmul" if want == "lax" else "lax"
        with monkeypatch.context() as env:
            env.setenv("FAN_JAX_CONV_IMPL", other)
            assert layers.conv_impl() == other, backend
            with layers.use_conv_impl(want):
                assert layers.conv_impl() == want, backend
        assert layers.conv_impl() == want, backend
