"""MobileFAN in PyTorch: the eager-mode twin that benchmarks/run.py times fan_jax against.

Same architecture as ``fan_jax.models.mobilefan`` (REFERENCE.md section 1), written without
torchvision so the benchmark needs only ``torch``: MobileNetV2 (width 1.0) up to the 320-channel
bottleneck, 3 x [ConvTranspose2d(k=2, s=2, no bias), BN, ReLU] and a 1x1 head with bias.
NCHW, as PyTorch expects; the benchmark may switch it to channels_last.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s): MobileNetV2 Table 2 without the
# final 1x1 conv to 1280, which MobileFAN drops.
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn_relu6(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1); residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu6(cin, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV2Features(nn.Module):
    """MobileNetV2 width 1.0 up to and including the last (320-channel) bottleneck: stride 32."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in INVERTED_RESIDUAL_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*layers)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class TorchMobileFAN(nn.Module):
    """MobileFAN: returns (heatmaps [B, L, H/4, W/4], taps: three post-ReLU decoder outputs)."""

    def __init__(self, num_landmarks: int, decoder_channels: int = 128, num_deconv: int = 3):
        super().__init__()
        self.encoder = MobileNetV2Features()
        cin = self.encoder.out_channels
        blocks = []
        for _ in range(num_deconv):
            blocks.append(
                nn.Sequential(
                    nn.ConvTranspose2d(
                        cin, decoder_channels, kernel_size=2, stride=2, padding=0, bias=False
                    ),
                    nn.BatchNorm2d(decoder_channels),
                    nn.ReLU(inplace=True),
                )
            )
            cin = decoder_channels
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, num_landmarks, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x = self.encoder(x)
        taps = []
        for block in self.decoder:
            x = block(x)
            taps.append(x)
        return self.head(x), tuple(taps)


def render_gaussians(points_hm: torch.Tensor, size: int, sigma: float = 1.0) -> torch.Tensor:
    """[B, L, 2] heatmap-space (x, y) points -> [B, L, size, size] Gaussians with peak 1."""
    grid = torch.arange(size, dtype=points_hm.dtype, device=points_hm.device)
    dx = grid[None, None, :] - points_hm[..., 0:1]  # [B, L, W]
    dy = grid[None, None, :] - points_hm[..., 1:2]  # [B, L, H]
    gx = torch.exp(-(dx * dx) / (2 * sigma * sigma))
    gy = torch.exp(-(dy * dy) / (2 * sigma * sigma))
    return gy[..., :, None] * gx[..., None, :]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters only (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())
