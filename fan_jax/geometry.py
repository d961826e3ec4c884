"""Host-side geometry: flip permutations, crop affines, point transforms, image warping.

Coordinates follow the pixel-centre convention: 0-based, pixel (i, j) has its centre at
x=j, y=i, points are (x, y). cv2.warpAffine uses the same convention, so an affine that
maps points also maps images without half-pixel corrections.
"""

from __future__ import annotations

import cv2
import numpy as np


def _runs(*parts: int | tuple[int, int]) -> np.ndarray:
    """Expands ints and inclusive (a, b) runs (descending when a > b) into an index array."""
    out: list[int] = []
    for p in parts:
        if isinstance(p, tuple):
            a, b = p
            step = 1 if b >= a else -1
            out.extend(range(a, b + step, step))
        else:
            out.append(p)
    return np.asarray(out, dtype=np.int32)


# REFERENCE.md section 6; new[i] = old[perm[i]].
FLIP_PERMUTATIONS: dict[int, np.ndarray] = {
    68: _runs(
        (16, 0),
        (26, 17),
        27,
        28,
        29,
        30,
        35,
        34,
        33,
        32,
        31,
        45,
        44,
        43,
        42,
        47,
        46,
        39,
        38,
        37,
        36,
        41,
        40,
        (54, 48),
        (59, 55),
        (64, 60),
        67,
        66,
        65,
    ),
    98: _runs(
        (32, 0),
        46,
        45,
        44,
        43,
        42,
        50,
        49,
        48,
        47,
        37,
        36,
        35,
        34,
        33,
        41,
        40,
        39,
        38,
        51,
        52,
        53,
        54,
        (59, 55),
        72,
        71,
        70,
        69,
        68,
        75,
        74,
        73,
        64,
        63,
        62,
        61,
        60,
        67,
        66,
        65,
        (82, 76),
        (87, 83),
        (92, 88),
        95,
        94,
        93,
        97,
        96,
    ),
    29: _runs(
        1,
        0,
        3,
        2,
        6,
        7,
        4,
        5,
        9,
        8,
        11,
        10,
        14,
        15,
        12,
        13,
        17,
        16,
        19,
        18,
        20,
        21,
        23,
        22,
        24,
        25,
        26,
        27,
        28,
    ),
}
for _p in FLIP_PERMUTATIONS.values():
    _p.setflags(write=False)  # shared module state: nobody may edit it in place


def flip_permutation(num_landmarks: int) -> np.ndarray:
    """The horizontal-flip permutation for a landmark count (68, 98 or 29)."""
    try:
        return FLIP_PERMUTATIONS[int(num_landmarks)]
    except KeyError:
        raise ValueError(
            f"no flip permutation for {num_landmarks} landmarks; known counts: "
            f"{sorted(FLIP_PERMUTATIONS)}"
        ) from None


def box_from_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """Tight box (x0, y0, x1, y1) = floor(min), ceil(max) of [L, 2] landmarks, as the public code."""
    pts = np.asarray(landmarks, dtype=np.float64)
    lo = np.floor(pts.min(axis=0))
    hi = np.ceil(pts.max(axis=0))
    return np.array([lo[0], lo[1], hi[0], hi[1]], dtype=np.float32)


def crop_transform(
    box: np.ndarray,
    output_size: int = 256,
    box_scale: float = 1.25,
    rotation_deg: float = 0.0,
    scale: float = 1.0,
    flip: bool = False,
) -> np.ndarray:
    """Affine [2, 3] from the original image to a square crop.

    The crop is centred on the box centre with side max(w, h) * box_scale / scale
    (scale > 1 zooms in). That square's edges map to the crop's pixel edges
    [-0.5, output_size - 0.5]. Positive rotation turns the content counter-clockwise as
    displayed (cv2.getRotationMatrix2D's sign). flip then mirrors x' = output_size - 1 - x.
    """
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, dtype=np.float64))
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    side = max(x1 - x0, y1 - y0) * box_scale / scale
    if side <= 0:
        raise ValueError(f"degenerate box {box}")
    s = output_size / side
    t = np.deg2rad(rotation_deg)
    a, b = s * np.cos(t), s * np.sin(t)
    # y points down, so [[cos, sin], [-sin, cos]] turns content counter-clockwise on screen.
    lin = np.array([[a, b], [-b, a]])
    half = 0.5 * (output_size - 1)
    shift = np.array([half, half]) - lin @ np.array([cx, cy])
    m = np.concatenate([lin, shift[:, None]], axis=1)
    if flip:
        m = flip_affine(output_size) @ np.vstack([m, [0.0, 0.0, 1.0]])
    return m.astype(np.float64)


def flip_affine(output_size: int) -> np.ndarray:
    """Affine [2, 3] for x' = output_size - 1 - x (the mirror of a crop)."""
    return np.array([[-1.0, 0.0, output_size - 1.0], [0.0, 1.0, 0.0]])


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a [..., 2, 3] affine."""
    m = np.asarray(m, dtype=np.float64)
    lin_inv = np.linalg.inv(m[..., :2])
    shift = -np.einsum("...ij,...j->...i", lin_inv, m[..., 2])
    return np.concatenate([lin_inv, shift[..., None]], axis=-1)


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Applies a [..., 2, 3] affine to [..., L, 2] points (batch dims broadcast); a single
    point [2] gives a point [2]."""
    m = np.asarray(m, dtype=np.float64)
    pts = np.asarray(points)
    if pts.ndim == 1:
        return apply_affine(m, pts[None])[..., 0, :]
    out = pts.astype(np.float64) @ np.swapaxes(m[..., :2], -1, -2) + m[..., None, :, 2]
    return out.astype(np.result_type(pts.dtype, np.float32))


def warp_image(image: np.ndarray, m: np.ndarray, output_size: int = 256) -> np.ndarray:
    """Warps an HxWxC (or HxW) image with a [2, 3] original->crop affine; bilinear, zero border."""
    out = cv2.warpAffine(
        np.ascontiguousarray(image),
        np.asarray(m, dtype=np.float64),
        (output_size, output_size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    if image.ndim == 3 and out.ndim == 2:  # cv2 drops a single channel axis
        out = out[..., None]
    return out


def flip_landmarks(points: np.ndarray, output_size: int) -> np.ndarray:
    """Mirrors [..., L, 2] crop points (x' = output_size - 1 - x) and applies the permutation."""
    pts = np.asarray(points)
    perm = flip_permutation(pts.shape[-2])
    out = pts[..., perm, :].copy()
    out[..., 0] = output_size - 1 - out[..., 0]
    return out
