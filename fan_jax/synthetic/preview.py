"""Previews of the synthetic faces: landmarks drawn one colour per part, a grid of faces."""

from __future__ import annotations

import cv2
import numpy as np

from fan_jax.synthetic.parts import (
    INNER_LIP,
    JAW,
    LEFT_BROW,
    LEFT_EYE,
    NOSE_BRIDGE,
    NOSTRILS,
    OUTER_LIP,
    RIGHT_BROW,
    RIGHT_EYE,
)
from fan_jax.synthetic.render import render_face
from fan_jax.synthetic.seeds import image_rng


def draw_landmarks(img: np.ndarray, landmarks: np.ndarray, numbers: bool = False) -> np.ndarray:
    """A copy of img with the 68 points drawn, one colour per part (for eyeballing)."""
    out = img.copy()
    groups = [
        (JAW, (255, 255, 0)),
        (RIGHT_BROW, (255, 0, 0)),
        (LEFT_BROW, (0, 0, 255)),
        (NOSE_BRIDGE, (0, 255, 0)),
        (NOSTRILS, (0, 255, 255)),
        (RIGHT_EYE, (255, 0, 0)),
        (LEFT_EYE, (0, 0, 255)),
        (OUTER_LIP, (255, 0, 255)),
        (INNER_LIP, (255, 128, 0)),
    ]
    for idx, c in groups:
        for i in idx:
            cv2.circle(
                out, tuple(int(v) for v in np.round(landmarks[i] * 4)), 8, c, -1, cv2.LINE_AA, 2
            )
            if numbers:
                cv2.putText(
                    out,
                    str(i),
                    tuple(int(v) + 2 for v in landmarks[i]),
                    cv2.FONT_HERSHEY_PLAIN,
                    0.6,
                    c,
                    1,
                    cv2.LINE_AA,
                )
    return out


def write_preview(
    path: str,
    num: int = 12,
    seed: int = 0,
    size: int = 256,
    cols: int = 4,
    challenging: bool = False,
    numbers: bool = False,
) -> np.ndarray:
    """A grid of faces with their landmarks drawn, saved as an image; returns the grid (RGB)."""
    tiles = []
    for i in range(num):
        img, lm = render_face(image_rng(seed, i, 99), size, challenging)
        tiles.append(np.concatenate([img, draw_landmarks(img, lm, numbers)], 1))
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[r : r + cols], 1) for r in range(0, len(tiles), cols)]
    grid = np.concatenate(rows, 0)
    cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return grid
