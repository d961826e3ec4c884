"""Faces on an image: reading the image, the `Face` record that `fan_jax.predict` returns and
`fan_jax.video` draws, and `draw_faces`. Shared by both so neither imports the other's module.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import cv2
import numpy as np

from fan_jax.errors import FanJaxError


class ImageReadError(FanJaxError, ValueError):
    """A file is missing or is not an image OpenCV can decode."""


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


def read_image(path: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an image file; ImageReadError when it is missing or no image."""
    if not os.path.exists(path):
        raise ImageReadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageReadError(f"{path}: is a directory")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read ({e.strerror})") from None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ImageReadError(f"{path}: not an image OpenCV can decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def parse_box(text: str) -> np.ndarray:
    """'x0,y0,x1,y1' -> [4] float32; ValueError on anything else."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 4 or not (vals[2] > vals[0] and vals[3] > vals[1]):
        raise ValueError(f"--box wants x0,y0,x1,y1 with x1 > x0 and y1 > y0, got {text!r}")
    return np.asarray(vals, np.float32)
