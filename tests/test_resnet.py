"""ResNetEncoder: parameter counts, and the torchvision style against a plain PyTorch ResNet.

The Keras style is tested against keras.applications.ResNet50 in test_pretrained.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch import nn as tnn

from fan_jax.models.resnet import ResNetEncoder

torch.set_num_threads(1)


# ----------------------------------------------------------------- PyTorch reference (torchvision)


class TorchBasic(tnn.Module):
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(width)
        self.conv2 = tnn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(cin, width, 1, stride, bias=False), tnn.BatchNorm2d(width)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(tnn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(width)
        self.conv2 = tnn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(width)
        self.conv3 = tnn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(4 * width)
        self.downsample = None
        if stride != 1 or cin != 4 * width:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(cin, 4 * width, 1, stride, bias=False), tnn.BatchNorm2d(4 * width)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(tnn.Module):
    """torchvision.models.resnet without avgpool/fc."""

    def __init__(self, block, counts):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), counts)):
            blocks = []
            for j in range(count):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i + 1}", tnn.Sequential(*blocks))

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


TORCH_RESNETS = {18: (TorchBasic, (2, 2, 2, 2)), 50: (TorchBottleneck, (3, 4, 6, 3))}


def random_torch_resnet(depth: int, seed: int) -> TorchResNet:
    torch.manual_seed(seed)
    net = TorchResNet(*TORCH_RESNETS[depth])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, tnn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (1.0 / fan_in) ** 0.5)
            elif isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


def torch_to_flax(net: TorchResNet) -> dict:
    """The obvious name mapping: layer{s}.{i}.convK -> conv{s+1}_block{i+1}/K_conv."""
    flat = {}

    def put(path, module):
        if isinstance(module, tnn.Conv2d):
            flat[("params", *path, "kernel")] = module.weight.detach().numpy().transpose(2, 3, 1, 0)
        else:
            flat[("params", *path, "scale")] = module.weight.detach().numpy().copy()
            flat[("params", *path, "bias")] = module.bias.detach().numpy().copy()
            flat[("batch_stats", *path, "mean")] = module.running_mean.numpy().copy()
            flat[("batch_stats", *path, "var")] = module.running_var.numpy().copy()

    put(("conv1_conv",), net.conv1)
    put(("conv1_bn",), net.bn1)
    for s in range(1, 5):
        for i, block in enumerate(getattr(net, f"layer{s}")):
            name = f"conv{s + 1}_block{i + 1}"
            for k in (1, 2, 3):
                if hasattr(block, f"conv{k}"):
                    put((name, f"{k}_conv"), getattr(block, f"conv{k}"))
                    put((name, f"{k}_bn"), getattr(block, f"bn{k}"))
            if block.downsample is not None:
                put((name, "0_conv"), block.downsample[0])
                put((name, "0_bn"), block.downsample[1])
    variables = traverse_util.unflatten_dict(flat)
    return jax.tree.map(jnp.asarray, variables)


# ----------------------------------------------------------------------------------------- tests


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "depth,keras_style,params,channels",
    [
        (18, False, 11_176_512, 512),  # torchvision resnet18 (11,689,512) less fc
        (34, False, 21_284_672, 512),
        (50, False, 23_508_032, 2048),  # torchvision resnet50 (25,557,032) less fc
        (50, True, 23_534_592, 2048),  # Keras ResNet50(include_top=False) trainable params
        (101, False, 42_500_160, 2048),
    ],
)
def test_param_count_and_output_shape(depth, keras_style, params, channels):
    model = ResNetEncoder(depth, keras_style=keras_style)
    x = jnp.zeros((2, 256, 256, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert count(variables["params"]) == params
    out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert out.shape == (2, 8, 8, channels)
    # 1x1 convs keep nn.Conv's kernel layout; only the Keras style has conv biases.
    block = variables["params"]["conv3_block1"]
    assert block["0_conv"]["kernel"].shape[:2] == (1, 1)
    assert ("bias" in block["1_conv"]) == keras_style


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_style_matches_pytorch(depth):
    net = random_torch_resnet(depth, seed=depth).eval()
    variables = torch_to_flax(net)
    # Odd sizes along the way (35, 18, 9, 5, 3 rows): symmetric vs 'SAME' padding differs here.
    x = np.random.default_rng(0).normal(size=(2, 70, 52, 3)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    model = ResNetEncoder(depth)
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert got.shape == expected.shape == (2, 3, 2, 512 * TORCH_RESNETS[depth][0].expansion)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-4)


def test_train_mode_matches_pytorch_and_updates_means():
    """Batch statistics in the forward pass; running means follow PyTorch's momentum 0.1."""
    net = random_torch_resnet(18, seed=1).train()
    variables = torch_to_flax(net)
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    model = ResNetEncoder(18)
    got, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-4)
    new_means = traverse_util.flatten_dict(updates["batch_stats"])
    torch_means = traverse_util.flatten_dict(torch_to_flax(net)["batch_stats"])
    old_means = traverse_util.flatten_dict(variables["batch_stats"])
    for path in torch_means:
        if path[-1] == "mean":
            assert not np.allclose(new_means[path], old_means[path])
            np.testing.assert_allclose(
                new_means[path], torch_means[path], rtol=0, atol=1e-5, err_msg=str(path)
            )


def test_invalid_depth():
    with pytest.raises(ValueError, match="depth"):
        ResNetEncoder(42).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
