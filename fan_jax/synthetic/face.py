"""Drawing a posed synthetic face through its landmarks: body, ears, hair, skin, brows, eyes,
nose, mouth, glasses (the jaw is the face outline, eye contours are the lids, the lips are the
lip contours), so the landmark-image relationship is the same in every image."""

from __future__ import annotations

import math
from types import SimpleNamespace

import cv2
import numpy as np

from fan_jax.synthetic.drawing import _blend_inside, _colour, _ellipse, _fill, _line, _spline
from fan_jax.synthetic.parts import INNER_LIP, LEFT_BROW, LEFT_EYE, OUTER_LIP, RIGHT_BROW, RIGHT_EYE


def _draw_face(img: np.ndarray, f: SimpleNamespace, g: dict, features: bool = True):
    s = g["scale"]
    lm = g["landmarks"]
    skin = f.skin
    up = g["up"]

    _fill(img, g["body"], f.clothes)
    _fill(img, g["neck"], skin * 0.72)
    long_hair = f.hair_style == "long"
    if f.hair_style == "short":
        _fill(img, g["hair_back"], f.hair)
    for k in range(2):
        ax = g["ear_axes"][k]
        c = g["ears"][k] + g["right"] * (-1 if k == 0 else 1) * ax[0] * 0.4
        _ellipse(img, c, ax, g["angle"], skin * 0.92)
        _ellipse(img, c, (ax[0] * 0.5, ax[1] * 0.6), g["angle"], skin * 0.75)
    if long_hair:
        _fill(img, g["hair_back"], f.hair)
    if f.shade < 1.0:
        # A darker rim on the side away from the light: the face polygon, then a smaller lit one.
        _fill(img, g["outline"], skin * f.shade)
        c = g["outline"].mean(0)
        lit = (
            c
            + (g["outline"] - c) * 0.92
            + np.array([math.cos(f.light), math.sin(f.light)]) * 0.04 * s
        )
        _fill(img, lit, skin)
    else:
        _fill(img, g["outline"], skin)
    if f.jaw_line:
        _line(img, g["jaw"], skin * f.jaw_shade, max(1.0, 0.012 * s))
    if f.hair_style in ("short", "long"):
        _fill(img, g["cap"], f.hair)
        _line(img, g["cap"], f.hair, 2)  # covers the anti-aliased seam along the face outline
    elif f.hair_style == "hat":
        _fill(img, g["cap"], f.hat)
        _line(img, g["cap"], f.hat, 2)
        _line(
            img, g["cap"][len(g["cap"]) // 2 - 10 : len(g["cap"]) // 2 + 11], f.hat * 0.6, 0.06 * s
        )
    if not features:
        return

    # Brows: landmarks along the upper edge, the brow hangs below them and thins outward.
    for idx in (RIGHT_BROW, LEFT_BROW):
        c = _spline(lm[idx], False, 6)
        t = np.linspace(0, 1, len(c))
        if idx[0] == 22:
            t = t[::-1]  # thickness grows toward the inner end (21, 22)
        thick = f.brow_thick * s * (0.45 + 0.55 * t)
        top = c + up * (0.2 * f.brow_thick * s)
        bottom = c - up[None] * thick[:, None]
        brow = np.concatenate([top, bottom[::-1]])
        contour = g["outline"].astype(np.float32).reshape(-1, 1, 2)
        if (
            min(
                cv2.pointPolygonTest(contour, (float(q[0]), float(q[1])), False)
                for q in brow[[0, -1]]
            )
            < 0
        ):
            # Far-side brow turned past the cheek: hide what is behind the outline.
            _blend_inside(
                img, g["outline"], lambda layer, o, brow=brow: _fill(layer, brow - o, f.brow_colour)
            )
        else:
            _fill(img, brow, f.brow_colour)

    # Eyes: sclera through the six contour points, iris clipped by the lids, lid lines on top.
    for k, idx in enumerate((RIGHT_EYE, LEFT_EYE)):
        ring = _spline(lm[idx], True, 8)
        upper = _spline(lm[idx[[0, 1, 2, 3]]], False, 8)  # corner, two upper-lid points, corner
        lower = _spline(lm[idx[[3, 4, 5, 0]]], False, 8)
        eye_h = float(np.abs(lm[idx[1:3]] - lm[idx[[5, 4]]]).max())
        if eye_h > 1.5:
            iris_c, axes = g["irises"][k], g["iris_axes"]

            def paint(layer, origin, iris_c=iris_c, axes=axes):
                layer[...] = np.array(_colour(f.sclera), np.uint8)
                _ellipse(layer, iris_c - origin, axes, g["angle"], f.iris)
                _ellipse(
                    layer,
                    iris_c - origin,
                    (axes[0] * 0.45, axes[1] * 0.45),
                    g["angle"],
                    f.iris * 0.2,
                )
                if f.catchlight:
                    _ellipse(
                        layer,
                        iris_c - origin + (up + g["right"]) * axes[1] * 0.3,
                        (axes[1] * 0.18, axes[1] * 0.18),
                        0,
                        (250, 250, 250),
                    )

            _blend_inside(img, ring, paint)
        lash = f.brow_colour * 0.5
        if f.crease and eye_h > 1.5:
            _line(
                img, upper[2:-2] + up * (0.45 * eye_h + 0.02 * s), skin * 0.78, max(1.0, 0.008 * s)
            )
        _line(img, upper, lash, max(1.0, 0.016 * s))
        _line(img, lower, skin * 0.55, max(1.0, 0.007 * s))

    # Nose: bridge line ending at the tip, tip highlight, nostril base curve, nostrils, wings.
    nose_c = skin * 0.62
    _line(img, _spline(lm[27:31], False, 6), skin * 0.75, max(1.0, 0.012 * s))
    _ellipse(
        img,
        lm[30] + up * 0.01 * s,
        (0.035 * s, 0.03 * s),
        g["angle"],
        np.minimum(skin * 1.12 + 8, 255),
    )
    for i, j in ((31, 32), (34, 35)):
        m = 0.5 * (lm[i] + lm[j]) + up * 0.022 * s
        _ellipse(img, m, (0.04 * s, 0.018 * s), g["angle"], skin * 0.3)
    _line(img, _spline(lm[31:36], False, 6), nose_c, max(1.0, 0.013 * s))
    for w in g["wings"]:
        _line(img, _spline(w, False, 6), skin * 0.7, max(1.0, 0.01 * s))
    if f.smile_lines:
        for i, j in ((31, 48), (35, 54)):
            a = lm[i] + (lm[i] - lm[33]) * 0.5
            b = lm[j] + (lm[j] - 0.5 * (lm[51] + lm[57])) * 0.12 - up * 0.05 * s
            _line(
                img,
                _spline(np.array([a, 0.5 * (a + b) + (lm[i] - lm[33]) * 0.25, b]), False, 6),
                skin * 0.8,
                max(1.0, 0.008 * s),
            )

    # Mouth: lips through the outer contour, cavity (teeth, tongue) through the inner one.
    outer = _spline(lm[OUTER_LIP], True, 6)
    inner = _spline(lm[INNER_LIP], True, 6)
    if f.moustache:
        # Between the nostrils and the upper lip, leaving both contours in sight.
        top = 0.55 * lm[31:36] + 0.45 * lm[49:54]
        bottom = _spline(lm[48:55], False, 4)[::-1] + up * 0.012 * s
        _fill(
            img,
            np.concatenate([lm[48:49] + up * 0.02 * s, top, lm[54:55] + up * 0.02 * s, bottom]),
            f.hair * 0.8,
        )
    _fill(img, outer, f.lip)
    if f.lip_outline:
        _line(img, outer, f.lip * 0.75, max(1.0, 0.006 * s))
    gap = float(np.linalg.norm(lm[[61, 62, 63]] - lm[[67, 66, 65]], axis=1).max())
    if gap > 1.5:
        up_inner = _spline(lm[60:65], False, 6)

        def cavity(layer, origin):
            layer[...] = np.array(_colour(f.cavity), np.uint8)
            if f.tongue:
                m = 0.5 * (lm[66] + lm[62]) - up * gap * 0.45 - origin
                _ellipse(
                    layer,
                    m,
                    (0.25 * np.linalg.norm(lm[64] - lm[60]), gap * 0.4),
                    g["angle"],
                    (190, 90, 100),
                )
            if f.teeth:
                band = up_inner - origin
                _fill(
                    layer,
                    np.concatenate([band, band[::-1] - up * min(gap * 0.45, 0.06 * s)]),
                    (240, 236, 225),
                )

        _blend_inside(img, inner, cavity)
    _line(img, _spline(lm[60:65], False, 6), f.cavity * 0.8, max(1.0, 0.008 * s))
    if gap > 1.5:
        _line(img, _spline(lm[[64, 65, 66, 67, 60]], False, 6), f.lip * 0.6, max(1.0, 0.005 * s))

    if f.glasses:
        for idx in (RIGHT_EYE, LEFT_EYE):
            c = lm[idx].mean(0)
            ew = np.linalg.norm(lm[idx[0]] - lm[idx[3]])
            axes = (ew * 0.8, ew * 0.55)
            if f.sunglasses:

                def tint(layer, origin, c=c, axes=axes):
                    layer[...] = np.array(_colour(f.glasses_colour * 0.25), np.uint8)

                lens = cv2.ellipse2Poly(  # type: ignore[attr-defined]  # cv2 stubs: a Sequence
                    tuple(int(v) for v in c),
                    tuple(int(v) for v in axes),
                    int(g["angle"]),
                    0,
                    360,
                    10,
                ).astype(np.float64)
                _blend_inside(img, lens, tint)
            _ellipse(img, c, axes, g["angle"], f.glasses_colour, max(1, int(0.015 * s)))
        r_in = lm[39] + g["right"] * 0.3 * np.linalg.norm(lm[36] - lm[39])
        l_in = lm[42] - g["right"] * 0.3 * np.linalg.norm(lm[42] - lm[45])
        _line(img, [r_in, lm[27] + up * 0.03 * s, l_in], f.glasses_colour, max(1, 0.012 * s))
