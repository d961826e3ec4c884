"""The landmarks function: uint8 crops -> landmarks in crop pixels, for every model kind.

One pure, jittable function serves evaluation, `fan_jax.predict` and `fan_jax.export`, so
decoding and flip-test exist once. A model kind is its raw output and two maps on it:

  heatmap     raw = heatmaps [B, h, h, L]; mirror = flip the maps and permute the channels;
              decode = sub-pixel peaks scaled to crop pixels; scores = the peak values.
  regression  raw = coordinates normalised to the crop, u = (p + 0.5) / S (KD-Loss);
              mirror = x -> 1 - x and permute; decode = p = u S - 0.5; scores = ones.

Flip-test averages the raw outputs of the crop and of its mirror (mapped back), then decodes.
Mirroring the crop (x' = W-1-x) and a heatmap (x' = w-1-x) reflect about the same edge in the
pixel-centre convention, so averaged maps need no shift.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fan_jax import heatmaps

KINDS = ("heatmap", "regression")
PyTree = Any
# What the encoders' ImageNet weights expect (torchvision's and Keras's 'torch' mode).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: Any) -> Any:
    """uint8 [..., 3] images -> ImageNet mean/std float32 (jnp; call inside the jitted step)."""
    x = jnp.asarray(images).astype(jnp.float32) * (1.0 / 255.0)
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def normalize_np(images: np.ndarray) -> np.ndarray:
    """numpy twin of :func:`normalize` (host-side tools, tests)."""
    x = np.asarray(images, dtype=np.float32) * (1.0 / 255.0)
    return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def to_normalized(points: Any, size: int) -> Any:
    """Crop pixel coordinates -> [0, 1] of the crop (pixel edges at 0 and 1)."""
    return (points + 0.5) / size


def from_normalized(u: Any, size: int) -> Any:
    return u * size - 0.5


def unflip_normalized(u: Any, perm: Any) -> Any:
    """Normalised landmarks of a mirrored crop -> the crop's: x -> 1 - x, then the permutation."""
    xp = jnp if isinstance(u, jax.Array) else np
    return xp.stack([1.0 - u[..., 0], u[..., 1]], axis=-1)[..., np.asarray(perm), :]


def prepare_images(images: jax.Array) -> jax.Array:
    """uint8 crops -> ImageNet-normalised float32; float input passes through."""
    if images.dtype == jnp.uint8:
        return normalize(images)
    return images.astype(jnp.float32)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {KINDS}, got {kind!r}")


def raw_outputs(kind: str, model: Any, variables: PyTree, x: jax.Array) -> jax.Array:
    """The model's raw inference output on normalised images (heatmaps or u coordinates)."""
    _check_kind(kind)
    out = model.apply(variables, x, train=False)
    return out[0] if kind == "heatmap" else out


def unmirror(kind: str, raw: jax.Array, perm: Any) -> jax.Array:
    """The raw output of a mirrored crop, mapped back onto the crop."""
    if kind == "heatmap":
        return heatmaps.flip_heatmaps(raw, perm)
    return unflip_normalized(raw, perm)


def decode(kind: str, raw: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """(landmarks [B, L, 2] in crop pixels, scores [B, L]) from raw outputs of size-px crops."""
    if kind == "heatmap":
        coords, peaks = heatmaps.decode_with_peaks(raw)
        return heatmaps.from_heatmap_coords(coords, stride=size / raw.shape[1]), peaks
    return from_normalized(raw, size), jnp.ones(raw.shape[:2], raw.dtype)


def landmarks(
    kind: str, model: Any, variables: PyTree, images: jax.Array, flip_perm: Any = None
) -> tuple[jax.Array, jax.Array]:
    """(landmarks in crop pixels [B, L, 2], scores [B, L]); flip-tested with `flip_perm`.

    `variables` is the model's own {'params', 'batch_stats'} (no adapters)."""
    x = prepare_images(images)
    raw = raw_outputs(kind, model, variables, x)
    if flip_perm is not None:
        raw = 0.5 * (
            raw + unmirror(kind, raw_outputs(kind, model, variables, x[:, :, ::-1]), flip_perm)
        )
    return decode(kind, raw, images.shape[1])


def landmarks_with_flip(
    kind: str, model: Any, variables: PyTree, images: jax.Array, flip_perm: Any = None
) -> tuple[jax.Array, jax.Array | None]:
    """(plain, flip-tested) crop-pixel landmarks from the same two forward passes, for
    evaluation, which reports both; the second is None without `flip_perm`."""
    x = prepare_images(images)
    size = images.shape[1]
    raw = raw_outputs(kind, model, variables, x)
    plain, _ = decode(kind, raw, size)
    if flip_perm is None:
        return plain, None
    mirrored = unmirror(kind, raw_outputs(kind, model, variables, x[:, :, ::-1]), flip_perm)
    flipped, _ = decode(kind, 0.5 * (raw + mirrored), size)
    return plain, flipped
