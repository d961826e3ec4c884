"""Drawing helpers of the synthetic faces: anti-aliased fixed-point OpenCV shapes, Catmull-Rom
curves through landmarks, clipped layers, and fixed noise tiles."""

from __future__ import annotations

import cv2
import numpy as np

_TILES: dict[str, np.ndarray] = {}


def _tile(kind: str) -> np.ndarray:
    """Fixed 768x768x3 uint8 noise tiles (per process, from a constant seed): 'fine' and 'cloud'.

    Cropping a random window is far cheaper than drawing fresh normal noise for every image,
    and stays deterministic because the window is chosen by the image's generator.
    """
    if not _TILES:
        g = np.random.default_rng(20240229)
        fine = g.integers(0, 256, (768, 768, 3), dtype=np.uint8)
        cloud = cv2.GaussianBlur(fine, (0, 0), 6, borderType=cv2.BORDER_WRAP)
        # OpenCV allocates dst when given None; its stubs do not say so.
        cloud = cv2.normalize(cloud, None, 0, 255, cv2.NORM_MINMAX)  # type: ignore[call-overload]
        _TILES["fine"], _TILES["cloud"] = fine, cloud
    return _TILES[kind]


def _tile_crop(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    t = _tile(kind)
    if h > t.shape[0] or w > t.shape[1]:
        reps = (h // t.shape[0] + 2, w // t.shape[1] + 2, 1)
        t = np.tile(t, reps)
    y = int(rng.integers(0, t.shape[0] - h + 1))
    x = int(rng.integers(0, t.shape[1] - w + 1))
    return t[y : y + h, x : x + w]


def _colour(c) -> tuple[float, float, float]:
    r, g, b = c.tolist() if isinstance(c, np.ndarray) else c
    return (min(max(r, 0.0), 255.0), min(max(g, 0.0), 255.0), min(max(b, 0.0), 255.0))


_SPLINE_BASIS: dict[int, np.ndarray] = {}


def _spline(p: np.ndarray, closed: bool, n: int = 8) -> np.ndarray:
    """Catmull-Rom curve through every point of p (so landmarks lie exactly on drawn curves)."""
    p = np.asarray(p, np.float64)
    if len(p) < 3:
        return p
    basis = _SPLINE_BASIS.get(n)
    if basis is None:
        t = np.arange(n) / n
        basis = 0.5 * np.stack(
            [
                -t + 2 * t**2 - t**3,
                2 - 5 * t**2 + 3 * t**3,
                t + 4 * t**2 - 3 * t**3,
                -(t**2) + t**3,
            ],
            1,
        )  # [n, 4]
        _SPLINE_BASIS[n] = basis
    if closed:
        ext = np.concatenate([p[-1:], p, p[:2]])
    else:
        ext = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
    segs = len(ext) - 3
    win = np.stack(
        [ext[0:segs], ext[1 : segs + 1], ext[2 : segs + 2], ext[3 : segs + 3]]
    )  # [4, segs, 2]
    c = (basis @ win.reshape(4, -1)).reshape(n, segs, 2).transpose(1, 0, 2).reshape(-1, 2)
    return c if closed else np.concatenate([c, p[-1:]])


def _fx(p) -> np.ndarray:
    return np.round(np.asarray(p) * 16.0).astype(np.int32).reshape(-1, 1, 2)


def _fill(img, p, colour):
    cv2.fillPoly(img, [_fx(p)], _colour(colour), cv2.LINE_AA, 4)


def _line(img, p, colour, thickness, closed=False):
    cv2.polylines(
        img, [_fx(p)], closed, _colour(colour), max(1, int(round(thickness))), cv2.LINE_AA, 4
    )


def _ellipse(img, centre, axes, angle, colour, thickness=-1):
    cv2.ellipse(
        img,
        tuple(int(v) for v in np.round(np.asarray(centre) * 16)),
        tuple(int(max(v, 0.5) * 16) for v in axes),
        float(angle),
        0,
        360,
        _colour(colour),
        thickness,
        cv2.LINE_AA,
        4,
    )


def _blend_inside(img, poly, draw, pad=3):
    """Runs draw(layer, origin) on a copy of the polygon's bounding box and keeps it inside poly."""
    h, w = img.shape[:2]
    x0, y0 = np.floor(poly.min(0)).astype(int) - pad
    x1, y1 = np.ceil(poly.max(0)).astype(int) + pad
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return
    roi = img[y0:y1, x0:x1]
    layer = roi.copy()
    origin = np.array([x0, y0], np.float64)
    draw(layer, origin)
    mask = np.zeros(roi.shape[:2], np.uint8)
    cv2.fillPoly(mask, [_fx(poly - origin)], 255, cv2.LINE_AA, 4)
    a = (mask.astype(np.float32) / 255.0)[..., None]
    roi[...] = (roi * (1.0 - a) + layer * a + 0.5).astype(np.uint8)
