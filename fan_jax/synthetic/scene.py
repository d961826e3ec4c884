"""Everything around a synthetic face: background clutter, occluders, and the camera's
lighting, blur and noise."""

from __future__ import annotations

import math

import cv2
import numpy as np

from fan_jax.synthetic.drawing import (
    _blend_inside,
    _colour,
    _ellipse,
    _fill,
    _fx,
    _line,
    _tile_crop,
)
from fan_jax.synthetic.parts import NUM_LANDMARKS
from fan_jax.synthetic.sampling import _SKIN


def _background(img: np.ndarray, rng: np.random.Generator, skin: np.ndarray, challenging: bool):
    h, w = img.shape[:2]
    base = rng.uniform(0, 255, 3)
    for _ in range(8):  # keep the plain background apart from the skin so the outline shows
        if np.abs(base - skin).sum() > 90:
            break
        base = rng.uniform(0, 255, 3)
    corners = np.clip(base[None, None] + rng.normal(0, 40, (2, 2, 3)), 0, 255).astype(np.uint8)
    img[...] = cv2.resize(corners, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        tex = _tile_crop(rng, "cloud", h, w)
        cv2.addWeighted(img, 1.0, tex, rng.uniform(0.1, 0.5), -127 * 0.3, dst=img)
    n = int(rng.integers(2, 30 if challenging else 22))
    side = max(h, w)
    # One batch of numbers for all shapes: per-call generator overhead dominates otherwise.
    kinds = rng.integers(0, 6, n)
    colours = rng.uniform(0, 255, (n, 3))
    u = rng.random((n, 16))
    for k in range(n):
        c = _colour(colours[k])
        q = u[k]
        x, y = (q[0] * 1.2 - 0.1) * w, (q[1] * 1.2 - 0.1) * h
        r = (0.02 + 0.33 * q[2]) * side
        kind = kinds[k]
        if kind == 0:
            _ellipse(img, (x, y), (r, r * (0.3 + 0.7 * q[3])), 180 * q[4], c)
        elif kind == 1:
            box = cv2.boxPoints(((x, y), (r * 2, r * (0.2 + 1.8 * q[3])), 90 * q[4]))
            _fill(img, box, c)
        elif kind == 2:
            m = 3 + int(q[3] * 4)
            pts = np.array([x, y]) + (q[4 : 4 + 2 * m].reshape(m, 2) - 0.5) * 2.5 * r
            _fill(img, pts, c)
        elif kind == 3:
            pts = np.array([x, y]) + (q[4:8].reshape(2, 2) - 0.5) * 3 * r
            _line(img, pts, c, 1 + 0.03 * side * q[8])
        elif kind == 4:  # stripes
            ang = math.pi * q[3]
            d = np.array([math.cos(ang), math.sin(ang)]) * r
            nrm = np.array([-d[1], d[0]]) / r
            step = 4 + 16 * q[4]
            o = np.array([x, y]) + nrm * (np.arange(3 + int(7 * q[5])) * step)[:, None]
            lines = np.stack([o - d, o + d], 1)
            cv2.polylines(
                img,
                list(_fx(lines).reshape(-1, 2, 1, 2)),
                False,
                c,
                max(1, int(step * 0.4)),
                cv2.LINE_AA,
                4,
            )
        else:  # textured patch
            pw, ph = min(int(r * 2) + 1, w), min(int(r * 2) + 1, h)
            x0, y0 = int(np.clip(x, 0, w - pw)), int(np.clip(y, 0, h - ph))
            patch = _tile_crop(rng, "fine" if q[3] < 0.5 else "cloud", ph, pw)
            roi = img[y0 : y0 + ph, x0 : x0 + pw]
            cv2.addWeighted(roi, 0.4, patch, 0.6, 0, dst=roi)
    if rng.random() < 0.3:  # out of focus; blurred at half size, which is as good and 4x cheaper
        small = cv2.resize(img, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)
        cv2.GaussianBlur(small, (0, 0), rng.uniform(0.5, 2.0), dst=small)
        cv2.resize(small, (w, h), dst=img, interpolation=cv2.INTER_LINEAR)


def _occluders(img, f, g, rng):
    lm = g["landmarks"]
    s = g["scale"]
    p_occ = 0.7 if f.challenging else 0.25
    n = 0
    while rng.random() < p_occ and n < (3 if f.challenging else 2):
        n += 1
        p_occ *= 0.5
        centre = lm[rng.integers(NUM_LANDMARKS)] + rng.normal(0, 0.15 * s, 2)
        r = rng.uniform(0.12, 0.45 if f.challenging else 0.32) * s
        kind = rng.integers(5)
        colour = rng.uniform(0, 255, 3)
        ang = rng.uniform(0, 180)
        if kind == 0:  # hand: palm and fingers in some skin tone
            hand = _SKIN[rng.integers(len(_SKIN))] * rng.uniform(0.85, 1.1)
            _ellipse(img, centre, (r, r * 0.8), ang, hand)
            d = np.array([math.cos(math.radians(ang)), math.sin(math.radians(ang))])
            nrm = np.array([-d[1], d[0]])
            for k in range(4):
                base = centre + d * r * 0.7 + nrm * (k - 1.5) * r * 0.38
                _line(img, [base, base + d * r * rng.uniform(0.7, 1.1)], hand * 0.97, r * 0.3)
                _line(img, [base, base + d * r * 0.9], hand * 0.8, max(1.0, r * 0.02))
        elif kind == 1:
            box = cv2.boxPoints((tuple(centre), (2 * r, 2 * r * rng.uniform(0.3, 1.2)), ang))
            _fill(img, box, colour)
        elif kind == 2:
            _ellipse(img, centre, (r, r * rng.uniform(0.3, 1.0)), ang, colour)
        elif kind == 3:  # bar: microphone, pen, strand of hair
            d = np.array([math.cos(math.radians(ang)), math.sin(math.radians(ang))])
            _line(
                img, [centre - d * r * 2, centre + d * r * 2], colour, rng.uniform(0.03, 0.15) * s
            )
        else:  # textured patch
            box = cv2.boxPoints((tuple(centre), (2 * r, 2 * r), ang))
            tex = _tile_crop(rng, "cloud", img.shape[0], img.shape[1])

            def paint(layer, origin, tex=tex, colour=colour):
                th, tw = layer.shape[:2]
                layer[...] = (tex[:th, :tw] * (colour / 255.0)).astype(np.uint8)

            _blend_inside(img, box.astype(np.float64), paint)


def _degrade(img, f, rng):
    """Lighting gradient, colour cast, blur, noise, sometimes greyscale."""
    h, w = img.shape[:2]
    hard = f.challenging
    g = rng.uniform(0.45 if hard else 0.6, 1.3, (2, 2, 1)) * rng.uniform(0.9, 1.1, (1, 1, 3))
    g = np.clip(g, 0, 1.99)  # a 2x2 gain field: light from one side plus a colour cast
    gain = cv2.resize((g * 128).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
    cv2.multiply(img, gain, dst=img, scale=1.0 / 128)
    if rng.random() < 0.5:
        gamma = rng.uniform(0.7, 1.4)
        lut = (255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
        cv2.LUT(img, lut, dst=img)
    if rng.random() < (0.5 if hard else 0.3):
        cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 3.0 if hard else 1.8), dst=img)
    elif rng.random() < 0.05:
        k = int(rng.integers(3, 9))
        kernel = np.zeros((k, k), np.float32)
        ang = rng.uniform(0, math.pi)
        c = (k - 1) / 2
        cv2.line(
            kernel,
            (int(round(c - c * math.cos(ang))), int(round(c - c * math.sin(ang)))),
            (int(round(c + c * math.cos(ang))), int(round(c + c * math.sin(ang)))),
            1.0,
            1,
        )
        cv2.filter2D(img, -1, kernel / kernel.sum(), dst=img)
    amp = rng.uniform(0, 0.12 if hard else 0.06)
    if amp > 0.01:
        noise = _tile_crop(rng, "fine", h, w)
        cv2.addWeighted(img, 1.0, noise, amp, -127.5 * amp, dst=img)
    if rng.random() < 0.04:
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        img[...] = grey[..., None]
