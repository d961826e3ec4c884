"""Heatmap targets and decoding (jnp, jittable, batched, NHWC: [B, H, W, L]).

Heatmap pixel (i, j) has its centre at heatmap coords (x=j, y=i); with a stride s crop,
h = (p + 0.5) / s - 0.5. Because both the crop flip (x' = 255 - x) and the heatmap flip
(x' = 63 - x) are mirrors about the same edge, flip-test needs no one-pixel shift here
(the Simple Baselines code shifts because its coordinates are not pixel-centred).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_heatmap_coords(points: jnp.ndarray, stride: float = 4) -> jnp.ndarray:
    """Crop pixel coords -> heatmap coords: h = (p + 0.5) / stride - 0.5."""
    return (points + 0.5) / stride - 0.5


def from_heatmap_coords(points: jnp.ndarray, stride: float = 4) -> jnp.ndarray:
    """Heatmap coords -> crop pixel coords: p = (h + 0.5) * stride - 0.5."""
    return (points + 0.5) * stride - 0.5


def render_gaussians(
    points_hm: jnp.ndarray, size: int = 64, sigma: float = 1.0, truncate: float | None = None
) -> jnp.ndarray:
    """Unnormalised Gaussians (peak 1 at each point), [..., L, 2] -> [..., size, size, L] float32.

    The 2-D Gaussian is the product of two 1-D ones, so it is built as an outer product
    (cheap and exact). The centre is sub-pixel, not rounded. `truncate` (in sigmas) zeroes
    everything outside a square window, like Simple Baselines' 3-sigma targets; None keeps
    the full Gaussian.
    """
    pts = jnp.asarray(points_hm, jnp.float32)
    grid = jnp.arange(size, dtype=jnp.float32)
    # Per-axis offsets [..., size, L]: grid on the second-to-last axis, landmarks last (NHWC).
    dx = grid[:, None] - pts[..., None, :, 0]  # [..., size(W), L]
    dy = grid[:, None] - pts[..., None, :, 1]  # [..., size(H), L]
    inv = 1.0 / (2.0 * sigma * sigma)
    gx = jnp.exp(-dx * dx * inv)
    gy = jnp.exp(-dy * dy * inv)
    if truncate is not None:
        r = truncate * sigma
        gx = jnp.where(jnp.abs(dx) <= r, gx, 0.0)
        gy = jnp.where(jnp.abs(dy) <= r, gy, 0.0)
    # Broadcast multiply, not einsum: a dot_general may run at reduced precision on TPU.
    return gy[..., :, None, :] * gx[..., None, :, :]


def decode(heatmaps: jnp.ndarray, simple_baselines: bool = False) -> jnp.ndarray:
    """Argmax + quarter-pixel shift, [B, H, W, L] -> [B, L, 2] heatmap coords (x, y)
    (`decode_with_peaks`, without the peaks)."""
    return decode_with_peaks(heatmaps, simple_baselines)[0]


def decode_with_peaks(
    heatmaps: jnp.ndarray, simple_baselines: bool = False
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(heatmap coords (x, y) [B, L, 2], each map's maximum [B, L]): argmax + quarter-pixel
    shift of [B, H, W, L] heatmaps.

    Per axis, the argmax moves 0.25 px toward the larger of its two neighbours (not at all
    on a tie) when both neighbours exist (0 < x < W-1), as REFERENCE section 4 states.
    simple_baselines=True reproduces get_final_preds of the Simple Baselines code instead:
    it shifts only when 1 < x < W-1 and 1 < y < H-1 hold together (so index 1, whose
    neighbours exist, is never shifted) and returns (0, 0) for maps whose maximum is <= 0.
    Ties in the argmax go to the first pixel in row-major order, as np.argmax.
    """
    b, h, w, n = heatmaps.shape
    # Pixels stay on the major axis and landmarks on the minor one (no transpose), and the
    # argmax is a max then the first pixel holding it: two vectorised reductions, about 3x
    # faster under XLA:CPU than argmax over a transposed copy (benchmarks/run.py e2e).
    flat = heatmaps.reshape(b, h * w, n)
    # The barrier keeps XLA:CPU from fusing the broadcast below into the max's YNNPACK
    # reduction, which then wrote the [B, H*W, L] broadcast out (0.17 ms at 256 px).
    peak = jax.lax.optimization_barrier(jnp.max(flat, axis=1, keepdims=True))
    pixel = jnp.arange(h * w, dtype=jnp.int32)[None, :, None]
    idx = jnp.min(jnp.where(flat == peak, pixel, h * w), axis=1)
    # A map holding NaN has no pixel equal to its max: report pixel 0 for it.
    idx = jnp.where(idx == h * w, 0, idx)
    x = idx % w
    y = idx // w

    def value_at(yy: jnp.ndarray, xx: jnp.ndarray) -> jnp.ndarray:
        # Clipped reads are masked out below; clipping only keeps the gather in bounds.
        j = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
        return jnp.take_along_axis(flat, j[:, None, :], axis=1)[:, 0, :]

    sx = jnp.sign(value_at(y, x + 1) - value_at(y, x - 1))
    sy = jnp.sign(value_at(y + 1, x) - value_at(y - 1, x))
    if simple_baselines:
        ok_x = ok_y = (x > 1) & (x < w - 1) & (y > 1) & (y < h - 1)
    else:
        ok_x = (x > 0) & (x < w - 1)
        ok_y = (y > 0) & (y < h - 1)
    px = x.astype(jnp.float32) + jnp.where(ok_x, 0.25 * sx, 0.0)
    py = y.astype(jnp.float32) + jnp.where(ok_y, 0.25 * sy, 0.0)
    out = jnp.stack([px, py], axis=-1).astype(jnp.float32)
    if simple_baselines:
        positive = peak[:, 0, :] > 0
        out = jnp.where(positive[..., None], out, 0.0)
    return out, peak[:, 0, :]


def flip_heatmaps(heatmaps: jnp.ndarray, perm: np.ndarray | jnp.ndarray) -> jnp.ndarray:
    """Mirrors [B, H, W, L] heatmaps in x (x' = W-1-x) and reorders channels: new[i] = old[perm[i]]."""
    return jnp.take(heatmaps[:, :, ::-1, :], jnp.asarray(perm), axis=-1)
