"""Faces found on an image: the `Face` record that `fan_jax.predict` returns and
`fan_jax.video` draws, and `draw_faces`. Shared by both so neither imports the other's module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np


@dataclasses.dataclass
class Face:
    """One face: its box (x0, y0, x1, y1), landmarks [L, 2] (x, y) in image pixels and
    per-landmark scores (the heatmap peak, about 1 for a confident point)."""

    box: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray

    def to_json(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "scores": [round(float(s), 4) for s in self.scores],
        }


def as_rgb(image: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an image: grey and RGBA accepted, floats in [0, 1] or 0..255."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and img.size and img.max() <= 1.0:
            img = img * 255.0  # skimage-style float images in [0, 1]
        img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W, 3], got shape {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    elif img.shape[-1] == 4:
        img = img[..., :3]
    return img


def draw_faces(image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """A copy of the RGB image with each face's box and landmarks drawn."""
    out = as_rgb(image).copy()
    side = max(out.shape[:2])
    for face in faces:
        box_side = float(max(face.box[2] - face.box[0], face.box[3] - face.box[1]))
        r = max(1, int(round(box_side / 120)))
        t = max(1, side // 400)
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        cv2.rectangle(out, (x0, y0), (x1, y1), (255, 200, 0), t, cv2.LINE_AA)
        for x, y in face.landmarks:
            # Fixed-point coordinates keep sub-pixel positions on small images.
            cv2.circle(
                out,
                (int(round(x * 16)), int(round(y * 16))),
                r * 16,
                (0, 255, 0),
                -1,
                cv2.LINE_AA,
                shift=4,
            )
    return out
