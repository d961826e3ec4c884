"""The renderer: one synthetic face image with its landmarks, and in-memory sources of them."""

from __future__ import annotations

import math

import numpy as np

from fan_jax.synthetic.face import _draw_face
from fan_jax.synthetic.layout import _layout
from fan_jax.synthetic.sampling import _sample_face
from fan_jax.synthetic.scene import _background, _degrade, _occluders
from fan_jax.synthetic.seeds import _as_rng, image_rng


def _render(
    rng: np.random.Generator | int,
    size: int | tuple[int, int] = 320,
    challenging: bool = False,
    features: bool = True,
    occluders: bool = True,
    degrade: bool = True,
    pose: tuple[float, float, float] | None = None,
):
    """render_face with switches for tests; returns (image, landmarks, face parameters).

    Each stage draws from its own generator, so switching a stage off leaves the others unchanged.
    pose = (yaw, pitch, roll) in degrees replaces the sampled pose.
    """
    rng = _as_rng(rng)
    height, width = (
        (int(size), int(size))
        if isinstance(size, int | np.integer)
        else (int(size[0]), int(size[1]))
    )
    seeds = rng.integers(0, 2**63, 5)
    face_rng, place_rng, bg_rng, occ_rng, post_rng = (np.random.default_rng(int(x)) for x in seeds)
    f = _sample_face(face_rng, challenging)
    if pose is not None:
        f.yaw, f.pitch, f.roll = (math.radians(float(v)) for v in pose)
    g = _layout(f, height, width, place_rng)
    img = np.empty((height, width, 3), np.uint8)
    _background(img, bg_rng, f.skin, challenging)
    _draw_face(img, f, g, features)
    if occluders:
        _occluders(img, f, g, occ_rng)
    if degrade:
        _degrade(img, f, post_rng)
    return img, g["landmarks"].astype(np.float32), f


def render_face(
    rng: np.random.Generator | int, size: int | tuple[int, int] = 320, challenging: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic face: (RGB uint8 image [H, W, 3], landmarks float32 [68, 2], 0-based pixels).

    size is the side of a square image or (height, width). challenging draws iBUG-like faces:
    wider poses, stronger expressions, more occluders, blur and harsher lighting.
    """
    img, lm, _ = _render(rng, size, challenging)
    return img, lm


def sources(num_train: int, num_test: int, seed: int = 0, size: int = 160) -> dict[str, list[dict]]:
    """In-memory 68-point synthetic faces {'train', 'test'} in the TFDS feature layout (what
    `train_and_evaluate(sources=...)` takes: no build, the crop is the whole image)."""
    from fan_jax import geometry

    def make(n: int, stream: int) -> list[dict]:
        out = []
        for i in range(n):
            img, lm = render_face(image_rng(seed, i, stream), size)
            lm = lm.astype(np.float32)
            out.append(
                {
                    "image": img,
                    "landmarks": lm,
                    "box": geometry.box_from_landmarks(lm).astype(np.float32),
                    "to_original": np.eye(2, 3, dtype=np.float32),
                    "original_landmarks": lm,
                    "file_name": f"synthetic_{stream}_{i}",
                }
            )
        return out

    return {"train": make(num_train, 101), "test": make(num_test, 102)}
