"""The face's 3D model, posed and projected: the 68 landmarks and every 2D shape the drawing needs.

A face is a small 3D model (head cross-sections, eyes, brows, nose, lips), posed with yaw, pitch
and roll and projected orthographically. The jaw landmarks are the silhouette of the head, so a
yawed face keeps its outline while the nose slides toward the far side and that side compresses.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from fan_jax.synthetic.parts import (
    INNER_LIP,
    LEFT_BROW,
    LEFT_EYE,
    NOSE_BRIDGE,
    NOSTRILS,
    NUM_LANDMARKS,
    OUTER_LIP,
    RIGHT_BROW,
    RIGHT_EYE,
)


def _section(f: SimpleNamespace, y: np.ndarray, chin: float) -> tuple[np.ndarray, ...]:
    """Head cross-section at height y: half-width a, half-depth d, centre depth zc.

    Above the ear line the skull is an ellipsoid; below it the jaw is a superellipse whose
    sections shrink to the chin point and move forward to stay on the front of the face.
    """
    y = np.asarray(y, np.float64)
    skull = y < f.jaw_top
    ts = np.minimum(np.maximum((f.jaw_top - y) / f.skull, 0.0), 1.0)
    a_sk = f.width * np.sqrt(1.0 - ts * ts)
    d_sk = f.depth * a_sk / f.width
    v = np.minimum(np.maximum((y - f.jaw_top) / (chin - f.jaw_top), 0.0), 1.0)
    sin_a = v ** (f.jaw_power / 2.0)
    cos_a = np.sqrt(np.maximum(1.0 - sin_a * sin_a, 0.0))
    a_jaw = f.width * cos_a ** (2.0 / f.jaw_power) * (1.0 - f.taper * v * v)
    d_jaw = f.depth * np.sqrt(a_jaw / f.width)
    zc_jaw = f.depth * (1.0 - 0.15 * v * v) - d_jaw
    a = np.where(skull, a_sk, a_jaw)
    d = np.where(skull, d_sk, d_jaw)
    zc = np.where(skull, 0.0, zc_jaw)
    return a, d, zc


def _surface_z(f, x, y, chin):
    a, d, zc = _section(f, y, chin)
    return zc + d * np.sqrt(np.maximum(1.0 - (np.asarray(x) / np.maximum(a, 1e-6)) ** 2, 0.0))


def _silhouette(a, d, zc, y, yaw, side):
    """3D point of the head section that is the outline on one side (-1 image left, +1 right)."""
    c, s = math.cos(yaw), math.sin(yaw)
    r = np.sqrt((a * c) ** 2 + (d * s) ** 2) + 1e-12
    x = side * a * a * c / r
    z = zc + side * d * d * s / r
    out = np.empty((*np.shape(x), 3))
    out[..., 0], out[..., 1], out[..., 2] = x, y, z
    return out


def _jaw_curve(f, chin, n=48):
    """Heights of the left jaw from the ear line (jaw 0) to the chin (jaw 8), dense and landmark.

    The 9 landmarks are equally spaced by arc length of the frontal outline, as annotators do.
    """
    alpha = np.linspace(0.0, math.pi / 2, 257)
    p = f.jaw_power
    y = f.jaw_top + (chin - f.jaw_top) * np.sin(alpha) ** (2 / p)
    v = (y - f.jaw_top) / (chin - f.jaw_top)
    a = f.width * np.clip(np.cos(alpha), 0, 1) ** (2 / p) * (1 - f.taper * v**2)
    seg = np.hypot(np.diff(a), np.diff(y))
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    y_lm = np.interp(np.linspace(0, cum[-1], 9), cum, y)
    y_dense = np.interp(np.linspace(0, cum[-1], n), cum, y)
    return y_lm, np.unique(np.concatenate([y_dense, y_lm]))


def _canonical_features(f: SimpleNamespace, chin: float) -> np.ndarray:
    """3D landmarks 17..67 in the canonical frame (rows 0..16 are filled by the pose step)."""
    p = np.zeros((NUM_LANDMARKS, 3))
    lift = np.zeros((NUM_LANDMARKS, 2))

    # Brows 17..21 run from the outer end to the inner end; 22..26 mirror them.
    t = np.linspace(0.0, 1.0, 5)
    bx = -(f.brow_outer + (f.brow_inner - f.brow_outer) * t)
    by = (
        f.brow_y
        - f.brow_raise * (1.0 - 0.2 * t)
        - (f.brow_arch + 0.4 * f.brow_raise) * np.sin(math.pi * np.clip(t * 0.8 + 0.1, 0, 1)) ** 1.2
        + f.frown * t**2
    )
    bx = bx + f.frown * 0.4 * t**2
    p[17:22, 0], p[17:22, 1] = bx, by
    p[22:27, 0], p[22:27, 1] = -bx[::-1], by[::-1]

    # Eyes: right eye 36 outer corner, 37 38 upper lid, 39 inner corner, 40 41 lower lid
    # (clockwise as displayed); the left eye 42..47 is its mirror image, starting at the inner corner.
    for k, (first, sign) in enumerate(((36, -1.0), (42, 1.0))):
        w = f.eye_w
        cx = sign * f.eye_x
        lo = f.eye_lo * w
        up = lo - (lo + f.eye_up * w) * f.eye_open[k]
        outer = (cx + sign * w / 2, f.eye_y - f.eye_tilt)
        inner = (cx - sign * w / 2, f.eye_y)
        ring = np.array(
            [
                outer,
                (cx + sign * w / 6, f.eye_y + up),
                (cx - sign * w / 6, f.eye_y + up),
                inner,
                (cx - sign * w / 6, f.eye_y + lo),
                (cx + sign * w / 6, f.eye_y + lo),
            ]
        )
        if (
            sign > 0
        ):  # left eye starts at its inner corner: 42 inner, 43 44 upper, 45 outer, 46 47 lower
            ring = ring[[3, 2, 1, 0, 5, 4]]
        p[first : first + 6, :2] = ring

    # Nose bridge 27..30 down the midline to the tip; nostril base 31..35 from image left to right.
    p[27:31, 0] = 0.0
    p[27:31, 1] = np.linspace(0.35 * f.brow_y, f.nose_tip, 4)
    base_y = f.nose_tip + np.array([0.07, 0.11, 0.125, 0.11, 0.07])
    p[31:36, 0] = f.nose_w * np.array([-1.0, -0.45, 0.0, 0.45, 1.0])
    p[31:36, 1] = base_y

    # Lips. Smile raises and widens the corners; opening drops the lower lip with the jaw.
    mw = f.mouth_w + 0.5 * max(f.smile, 0.0)
    ym = f.mouth_y
    gap = f.mouth_open

    def line_y(x):  # the closed-mouth line between the lips
        return ym - f.smile * (x / mw) ** 2

    ox = mw * np.array([-1.0, -0.55, -0.22, 0.0, 0.22, 0.55, 1.0, 0.55, 0.22, 0.0, -0.22, -0.55])
    upper = np.array([0.0, 0.8, 1.0, 0.85, 1.0, 0.8, 0.0])
    lower = np.array([0.8, 1.0, 1.0, 1.0, 0.8])
    oy = np.empty(12)
    oy[:7] = line_y(ox[:7]) - 0.15 * gap * (upper > 0) - f.upper_lip * upper
    oy[7:] = line_y(ox[7:]) + 0.85 * gap + f.lower_lip * lower
    p[48:60, 0], p[48:60, 1] = ox, oy
    ix = mw * np.array([-0.86, -0.35, 0.0, 0.35, 0.86, 0.35, 0.0, -0.35])
    iy = line_y(ix)
    iy[[1, 2, 3]] -= 0.15 * gap
    iy[[5, 6, 7]] += 0.85 * gap
    p[60:68, 0], p[60:68, 1] = ix, iy

    # Asymmetry: whole-part offsets plus tiny per-point ones (not on the lids, which may touch).
    parts = (
        RIGHT_BROW,
        LEFT_BROW,
        NOSE_BRIDGE,
        NOSTRILS,
        RIGHT_EYE,
        LEFT_EYE,
        OUTER_LIP,
        INNER_LIP,
    )
    for i, idx in enumerate(parts):
        lift[idx] += f.part_jitter[i]
    lift[60:68] = f.part_jitter[6]  # inner lip moves with the outer lip
    still = np.concatenate([RIGHT_EYE, LEFT_EYE, INNER_LIP, np.arange(27, 31)])
    pj = f.point_jitter.copy()
    pj[still] = 0.0
    pj[27:31, 0] = 0.0
    p[17:, :2] += (lift + pj)[17:]

    # Depths: on the head surface, nose and lips stand out, eyes sit in.
    x, y = p[:, 0], p[:, 1]
    z = _surface_z(f, x, y, chin)
    z[36:48] -= 0.06
    z[17:27] += 0.01
    tt = np.linspace(0, 1, 4)
    z[27:31] = _surface_z(f, 0.0, y[27:31], chin) + 0.02 + f.nose_len * tt**1.5
    z[31:36] += f.nose_len * np.array([0.15, 0.35, 0.5, 0.35, 0.15])
    z[48:68] += 0.05 * (1.0 - (x[48:68] / mw) ** 2).clip(0) + 0.02
    p[:, 2] = z
    return p


def _rotations(yaw: float, pitch: float) -> tuple[np.ndarray, np.ndarray]:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return ry, rx


def _layout(f: SimpleNamespace, height: int, width: int, rng: np.random.Generator) -> dict:
    """Poses the face and returns every 2D pixel-space shape the drawing needs, and the landmarks."""
    chin = f.chin + 0.7 * f.mouth_open
    pts3 = _canonical_features(f, chin)
    y_lm, y_dense = _jaw_curve(f, chin)
    yaw = f.yaw

    # Head outline from the crown down the skull and the jaw, on both sides; the same
    # cross-sections give the jaw landmarks and the sides of the hair cap.
    y_top = f.jaw_top - f.skull
    y_skull = f.jaw_top - f.skull * np.cos(np.linspace(0.0, math.pi / 2, 24))[:-1]
    y_skull[0] = y_top + 1e-3
    y_side = np.concatenate([y_skull, y_dense])
    hl = f.brow_y - 0.12 - f.brow_raise if f.bangs else f.hairline
    y_cap = np.concatenate([[y_top + 1e-3], np.linspace(y_top + 0.05, hl, 12)])
    ys = np.concatenate([y_lm, y_side, y_cap, [hl]])
    a, d, zc = _section(f, ys, chin)
    left = _silhouette(a, d, zc, ys, yaw, -1.0)
    right = _silhouette(a, d, zc, ys, yaw, 1.0)
    n1, n2, n3 = len(y_lm), len(y_lm) + len(y_side), len(y_lm) + len(y_side) + len(y_cap)
    pts3[0:9] = left[:n1]
    pts3[8:17] = right[:n1][::-1]
    outline3 = np.concatenate([left[n1:n2], right[n1:n2][::-1]])
    jaw3 = np.concatenate([left[n1 + len(y_skull) : n2], right[n1 + len(y_skull) : n2][::-1]])

    # Hair: a bigger skull behind the head, a cap over the forehead down to the hairline,
    # which runs over the visible half of the head between the two outline points.
    hv = f.hair_volume
    y_hb = np.linspace(y_top - 0.12 * hv, f.jaw_top, 20)
    tsk = np.minimum((f.jaw_top - y_hb) / (f.skull * hv + 0.12), 1.0)
    a_hb = f.width * hv * np.sqrt(1 - tsk**2)
    d_hb = f.depth * a_hb / f.width
    hb_l = _silhouette(a_hb, d_hb, -0.05, y_hb, yaw, -1.0)
    hb_r = _silhouette(a_hb, d_hb, -0.05, y_hb, yaw, 1.0)
    if f.hair_style == "long":
        y_end = f.jaw_top + f.hair_len
        drop_l = np.array([[hb_l[-1, 0] - 0.05, y_end, -0.3]])
        drop_r = np.array([[hb_r[-1, 0] + 0.05, y_end, -0.3]])
        hair_back3 = np.concatenate([hb_l, drop_l, drop_r, hb_r[::-1]])
    else:
        hair_back3 = np.concatenate([hb_l, hb_r[::-1]])
    t_r = math.atan2(float(d[-1]) * math.sin(yaw), float(a[-1]) * math.cos(yaw))
    tt = np.linspace(t_r, t_r + math.pi, 25)
    y_hl = hl - (0.10 if not f.bangs else -0.05) * np.sin(tt - t_r)
    a_h, d_h, zc_h = _section(f, y_hl, chin)
    hairline3 = np.stack([a_h * np.cos(tt), y_hl, zc_h + d_h * np.sin(tt)], -1)
    cap_sides = (right[n2:n3], left[n2:n3][::-1])

    # Ears behind the face outline, neck and shoulders behind everything.
    ear_y = f.jaw_top + 0.17
    ears3 = np.array([[-f.width - 0.02, ear_y, -0.22], [f.width + 0.02, ear_y, -0.22]])
    neck_w = 0.52 * f.width
    neck3 = np.array(
        [
            [-neck_w, f.jaw_top + 0.6, -0.35],
            [neck_w, f.jaw_top + 0.6, -0.35],
            [neck_w * 1.1, chin + 1.2, -0.35],
            [-neck_w * 1.1, chin + 1.2, -0.35],
        ]
    )
    body3 = np.array(
        [
            [-0.7, chin + 0.75, -0.4],
            [0.7, chin + 0.75, -0.4],
            [2.1, chin + 1.2, -0.5],
            [2.7, chin + 6.0, -0.5],
            [-2.7, chin + 6.0, -0.5],
            [-2.1, chin + 1.2, -0.5],
        ]
    )

    # Irises: at the eye centre plus gaze, pushed slightly forward of the lids.
    iris_list = []
    for idx in (RIGHT_EYE, LEFT_EYE):
        corner_a, corner_b = pts3[idx[0]], pts3[idx[3]]
        c = 0.5 * (corner_a + corner_b)
        lo = 0.5 * (pts3[idx[4], 1] + pts3[idx[5], 1])
        up = 0.5 * (pts3[idx[1], 1] + pts3[idx[2], 1])
        c = c + np.array(
            [f.gaze[0] * f.eye_w * 0.25, 0.5 * (lo + up) - c[1] + f.gaze[1] * f.eye_w, 0.04]
        )
        iris_list.append(c)
    irises3 = np.array(iris_list)

    # Nose wings: short arcs rising from the nostril ends.
    wings3 = []
    for i, side in ((31, -1.0), (35, 1.0)):
        b = pts3[i]
        wings3.append(
            np.array([b + [side * 0.015, -0.17, -0.03], b + [side * 0.045, -0.08, -0.02], b])  # noqa: RUF005 (b is an array: elementwise +)
        )

    ry, rx = _rotations(f.yaw, f.pitch)
    cr, sr = math.cos(f.roll), math.sin(f.roll)
    r2 = np.array([[cr, sr], [-sr, cr]])

    def proj(q, outline=False):
        q = np.asarray(q, np.float64) @ ry.T
        if outline and f.pitch > 0:
            # Tilted up, the visible jaw line is the underside of the jaw, not the chin front:
            # damping depth for the pitch keeps the chin from rising above the jaw sides (a notch).
            q = q * np.array([1.0, 1.0, 0.3])
        return ((q @ rx.T)[..., :2]) @ r2.T

    lm = proj(pts3)
    lm[:17] = proj(pts3[:17], outline=True)
    lo, hi = lm.min(0), lm.max(0)
    side = float((hi - lo).max())
    scale = f.box_frac * min(height, width) / side
    # Place the landmark box anywhere that keeps every landmark inside the image.
    margin = 2.0
    room = np.array([width, height], np.float64) - 1 - 2 * margin
    scale = min(scale, float(np.min(room / np.maximum(hi - lo, 1e-9))))
    free = np.maximum(room - (hi - lo) * scale, 0.0)
    start = margin + rng.uniform(0, 1, 2) * free
    offset = start - lo * scale

    def px(q, outline=False):
        return proj(q, outline) * scale + offset

    up = r2 @ np.array([0.0, -1.0])
    cap = np.concatenate([px(cap_sides[0], True), px(hairline3[1:-1]), px(cap_sides[1], True)])
    out = dict(
        landmarks=(lm * scale + offset),
        scale=scale,
        up=up,
        right=r2 @ np.array([1.0, 0.0]),
        outline=px(outline3, True),
        jaw=px(jaw3, True),
        hair_back=px(hair_back3, True),
        cap=cap,
        ears=px(ears3),
        neck=px(neck3),
        body=px(body3),
        irises=px(irises3),
        wings=[px(w) for w in wings3],
    )
    # Ear and iris widths foreshorten with yaw; the near ear (away from the nose) widens.
    out["ear_axes"] = [
        (scale * (0.08 + 0.18 * max(0.0, math.sin(yaw) * -side_)), scale * 0.23)
        for side_ in (-1.0, 1.0)
    ]
    out["iris_axes"] = (
        scale * 0.21 * f.eye_w * abs(math.cos(yaw)) + 0.3,
        scale * 0.21 * f.eye_w * abs(math.cos(f.pitch)) + 0.3,
    )
    out["angle"] = -math.degrees(f.roll)
    return out
