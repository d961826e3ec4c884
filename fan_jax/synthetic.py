"""Procedural cartoon faces with exact 68-point (300W / iBUG) landmarks (the renderer).

`fan_jax.synthetic_300w` writes them as a 300W release tree; `sources` gives them in memory.

A face is a small 3D model (head cross-sections, eyes, brows, nose, lips), posed with yaw, pitch
and roll and projected orthographically. The jaw landmarks are the silhouette of the head, so a
yawed face keeps its outline while the nose slides toward the far side and that side compresses.
Everything is drawn through the landmarks (the jaw is the face outline, eye contours are the lids,
the lips are the lip contours), so the landmark-image relationship is the same in every image
while identity, pose, expression, colours, lighting, clutter, occluders and blur vary.

Landmarks are 0-based pixel centres (x, y) in memory; `.pts` files hold them 1-based (300W).
Images are RGB in memory. Every image comes from its own seed, (seed, subset, index), so any file
can be regenerated alone and the tree can be written by several processes.

    python -m fan_jax.synthetic --out /tmp/synth300w --num_train 600 --num_test 150
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import cv2
import numpy as np

NUM_LANDMARKS = 68

# 300W index groups (0-based).
JAW = np.arange(0, 17)
RIGHT_BROW = np.arange(17, 22)
LEFT_BROW = np.arange(22, 27)
NOSE_BRIDGE = np.arange(27, 31)
NOSTRILS = np.arange(31, 36)
RIGHT_EYE = np.arange(36, 42)
LEFT_EYE = np.arange(42, 48)
OUTER_LIP = np.arange(48, 60)
INNER_LIP = np.arange(60, 68)

# (folder, split, share of its split in the real 300W, extension, seed stream id).
SUBSETS = (
    ('afw', 'train', 337, '.jpg', 1),
    ('helen/trainset', 'train', 2000, '.jpg', 2),
    ('lfpw/trainset', 'train', 811, '.png', 3),
    ('helen/testset', 'common', 330, '.jpg', 4),
    ('lfpw/testset', 'common', 224, '.png', 5),
    ('ibug', 'challenging', 135, '.jpg', 6),
)


# ----------------------------------------------------------------------------- randomness

def image_rng(seed: int, index: int, subset: int = 0) -> np.random.Generator:
    """The generator of one image: independent of every other (seed, subset, index)."""
    return np.random.default_rng([int(seed), int(subset), int(index)])


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(int(rng))


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
        cloud = cv2.normalize(cloud, None, 0, 255, cv2.NORM_MINMAX)
        _TILES['fine'], _TILES['cloud'] = fine, cloud
    return _TILES[kind]


def _tile_crop(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    t = _tile(kind)
    if h > t.shape[0] or w > t.shape[1]:
        reps = (h // t.shape[0] + 2, w // t.shape[1] + 2, 1)
        t = np.tile(t, reps)
    y = int(rng.integers(0, t.shape[0] - h + 1))
    x = int(rng.integers(0, t.shape[1] - w + 1))
    return t[y:y + h, x:x + w]


# ----------------------------------------------------------------------------- sampling

_SKIN = np.array([(255, 226, 200), (241, 196, 168), (224, 172, 128), (198, 136, 90),
                  (160, 104, 70), (120, 76, 52), (86, 56, 40)], np.float64)
_HAIR = np.array([(28, 24, 22), (62, 42, 30), (110, 74, 46), (180, 140, 90), (225, 196, 130),
                  (150, 70, 38), (150, 150, 150), (225, 225, 222)], np.float64)
_HAIR_P = np.array([0.3, 0.22, 0.15, 0.08, 0.08, 0.07, 0.06, 0.04])
_IRIS = np.array([(70, 45, 25), (110, 70, 35), (60, 100, 150), (70, 120, 80), (120, 100, 50),
                  (110, 120, 125), (40, 28, 20)], np.float64)


def _colour(c) -> tuple[float, float, float]:
    r, g, b = c.tolist() if isinstance(c, np.ndarray) else c
    return (min(max(r, 0.0), 255.0), min(max(g, 0.0), 255.0), min(max(b, 0.0), 255.0))


def _sample_face(rng: np.random.Generator, challenging: bool) -> SimpleNamespace:
    """Identity, expression, pose and appearance of one face.

    Canonical frame: units of about half the face width, eyes on y = 0, y down, z toward the
    camera, x to the image right. The subject's right side is at negative x.
    """
    u = rng.uniform
    f = SimpleNamespace()
    f.challenging = challenging
    # Head.
    f.width = u(0.92, 1.08)
    f.depth = u(0.80, 0.95)
    f.jaw_top = u(0.02, 0.18)
    f.chin = u(1.45, 1.70)
    f.jaw_power = u(2.0, 3.4)
    f.taper = u(0.0, 0.25)
    f.skull = u(1.15, 1.40)
    # Eyes.
    f.eye_x = u(0.44, 0.54)
    f.eye_w = u(0.30, 0.38)
    f.eye_up = u(0.26, 0.38)     # upper lid height / eye width at openness 1
    f.eye_lo = u(0.10, 0.17)     # lower lid depth / eye width
    f.eye_tilt = u(-0.02, 0.05)  # outer corner raised
    f.eye_y = u(-0.02, 0.02)
    # Brows.
    f.brow_y = u(-0.36, -0.27)
    f.brow_inner = u(0.10, 0.18)
    f.brow_outer = u(0.78, 0.92)
    f.brow_arch = u(0.02, 0.08)
    f.brow_thick = u(0.045, 0.10)
    # Nose.
    f.nose_tip = u(0.40, 0.52)
    f.nose_w = u(0.16, 0.25)
    f.nose_len = u(0.18, 0.32)
    # Mouth.
    f.mouth_y = u(0.95, 1.06)
    f.mouth_w = u(0.33, 0.45)
    f.upper_lip = u(0.06, 0.12)
    f.lower_lip = u(0.08, 0.15)

    # Expression.
    hard = 1.5 if challenging else 1.0
    f.mouth_open = u(0.03, 0.28 * hard) if rng.random() < (0.55 if challenging else 0.4) else 0.0
    f.smile = u(-0.03, 0.10)
    f.brow_raise = u(0.04, 0.15) if rng.random() < 0.3 else u(0.0, 0.02)
    f.frown = u(0.02, 0.07) if rng.random() < 0.15 else 0.0
    openness = u(0.55, 1.25) * (1.0 - 1.5 * max(f.smile, 0.0)) + 0.8 * f.brow_raise
    if rng.random() < 0.06:
        openness = u(0.0, 0.12)  # blink
    f.eye_open = np.array([openness, openness]) * u(0.9, 1.1, 2)
    if rng.random() < 0.02:
        f.eye_open[rng.integers(2)] = 0.0  # wink
    f.gaze = np.array([u(-0.25, 0.25), u(-0.12, 0.12)])
    # Small asymmetric offsets per part and per point (units), so no two faces are templates.
    f.part_jitter = rng.normal(0.0, 0.012, (9, 2))
    f.point_jitter = rng.normal(0.0, 0.005, (NUM_LANDMARKS, 2))

    # Pose (radians).
    if challenging:
        f.yaw = math.radians(u(-44, 44))
        f.pitch = math.radians(u(-22, 22))
        f.roll = math.radians(rng.normal(0, 18)) if rng.random() < 0.8 else math.radians(u(-45, 45))
    else:
        f.yaw = math.radians(float(np.clip(rng.normal(0, 14), -36, 36)))
        f.pitch = math.radians(float(np.clip(rng.normal(0, 7), -16, 16)))
        f.roll = math.radians(float(np.clip(rng.normal(0, 9), -28, 28)))
    f.roll = float(np.clip(f.roll, math.radians(-50), math.radians(50)))
    f.box_frac = u(0.26, 0.62) if challenging else u(0.30, 0.60)

    # Appearance.
    if rng.random() < 0.03:
        f.skin = rng.uniform(60, 240, 3)  # painted / odd white balance
    else:
        t = u(0, len(_SKIN) - 1)
        i = min(int(t), len(_SKIN) - 2)
        f.skin = _SKIN[i] * (1 - (t - i)) + _SKIN[i + 1] * (t - i) + rng.normal(0, 6, 3)
    if rng.random() < 0.05:
        f.hair = rng.uniform(0, 255, 3)
    else:
        f.hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)] * u(0.8, 1.15) + rng.normal(0, 6, 3)
    f.hair_style = rng.choice(['bald', 'short', 'long', 'hat'], p=[0.08, 0.47, 0.37, 0.08])
    f.hair_volume = u(1.04, 1.16) if f.hair_style != 'long' else u(1.12, 1.35)
    f.hair_len = u(0.3, 2.0)
    f.hairline = u(-1.0, -0.62)
    f.bangs = rng.random() < 0.12
    f.hat = rng.uniform(0, 255, 3)
    f.brow_colour = f.hair * u(0.35, 0.85) if rng.random() < 0.8 else f.skin * u(0.3, 0.6)
    lum = np.array([0.3, 0.59, 0.11])
    if f.brow_colour @ lum > f.skin @ lum - 50:  # brows must stay visible on the skin
        f.brow_colour = f.brow_colour * max(0.0, f.skin @ lum - 50) / max(f.brow_colour @ lum, 1.0)
    f.shade = u(0.8, 0.94) if rng.random() < 0.6 else 1.0
    f.light = u(0, 2 * math.pi)
    f.iris = _IRIS[rng.integers(len(_IRIS))] * u(0.8, 1.2)
    f.sclera = np.array([240, 238, 232]) * u(0.85, 1.05)
    f.lip = f.skin * np.array([0.82, 0.58, 0.58]) * u(0.8, 1.05) + np.array([25, 0, 8])
    if rng.random() < 0.1:
        f.lip = np.array([[190, 30, 50], [200, 80, 110], [110, 30, 60], [150, 60, 50]])[
            rng.integers(4)] * u(0.8, 1.1)
    f.cavity = np.array([60, 18, 22]) * u(0.5, 1.2)
    f.teeth = rng.random() < 0.7
    f.tongue = rng.random() < 0.4
    f.crease = rng.random() < 0.8
    f.lip_outline = rng.random() < 0.5
    f.jaw_line = rng.random() < 0.85
    f.jaw_shade = u(0.55, 0.85)
    f.smile_lines = rng.random() < (0.3 + 3.0 * max(f.smile, 0))
    f.catchlight = rng.random() < 0.7
    f.glasses = rng.random() < (0.15 if challenging else 0.08)
    f.sunglasses = f.glasses and rng.random() < (0.5 if challenging else 0.15)
    f.glasses_colour = rng.uniform(0, 200, 3)
    f.moustache = rng.random() < 0.07
    f.clothes = rng.uniform(0, 255, 3)
    return f


# ----------------------------------------------------------------------------- geometry

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
    out = np.empty(np.shape(x) + (3,))
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
    a = f.width * np.clip(np.cos(alpha), 0, 1) ** (2 / p) * (1 - f.taper * v ** 2)
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
    by = (f.brow_y - f.brow_raise * (1.0 - 0.2 * t)
          - (f.brow_arch + 0.4 * f.brow_raise) * np.sin(math.pi * np.clip(t * 0.8 + 0.1, 0, 1)) ** 1.2
          + f.frown * t ** 2)
    bx = bx + f.frown * 0.4 * t ** 2
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
        ring = np.array([outer,
                         (cx + sign * w / 6, f.eye_y + up),
                         (cx - sign * w / 6, f.eye_y + up),
                         inner,
                         (cx - sign * w / 6, f.eye_y + lo),
                         (cx + sign * w / 6, f.eye_y + lo)])
        if sign > 0:  # left eye starts at its inner corner: 42 inner, 43 44 upper, 45 outer, 46 47 lower
            ring = ring[[3, 2, 1, 0, 5, 4]]
        p[first:first + 6, :2] = ring

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
    parts = (RIGHT_BROW, LEFT_BROW, NOSE_BRIDGE, NOSTRILS, RIGHT_EYE, LEFT_EYE, OUTER_LIP, INNER_LIP)
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
    z[27:31] = _surface_z(f, 0.0, y[27:31], chin) + 0.02 + f.nose_len * tt ** 1.5
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
    jaw3 = np.concatenate([left[n1 + len(y_skull):n2], right[n1 + len(y_skull):n2][::-1]])

    # Hair: a bigger skull behind the head, a cap over the forehead down to the hairline,
    # which runs over the visible half of the head between the two outline points.
    hv = f.hair_volume
    y_hb = np.linspace(y_top - 0.12 * hv, f.jaw_top, 20)
    tsk = np.minimum((f.jaw_top - y_hb) / (f.skull * hv + 0.12), 1.0)
    a_hb = f.width * hv * np.sqrt(1 - tsk ** 2)
    d_hb = f.depth * a_hb / f.width
    hb_l = _silhouette(a_hb, d_hb, -0.05, y_hb, yaw, -1.0)
    hb_r = _silhouette(a_hb, d_hb, -0.05, y_hb, yaw, 1.0)
    if f.hair_style == 'long':
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
    neck3 = np.array([[-neck_w, f.jaw_top + 0.6, -0.35], [neck_w, f.jaw_top + 0.6, -0.35],
                      [neck_w * 1.1, chin + 1.2, -0.35], [-neck_w * 1.1, chin + 1.2, -0.35]])
    body3 = np.array([[-0.7, chin + 0.75, -0.4], [0.7, chin + 0.75, -0.4],
                      [2.1, chin + 1.2, -0.5], [2.7, chin + 6.0, -0.5], [-2.7, chin + 6.0, -0.5],
                      [-2.1, chin + 1.2, -0.5]])

    # Irises: at the eye centre plus gaze, pushed slightly forward of the lids.
    irises3 = []
    for k, idx in enumerate((RIGHT_EYE, LEFT_EYE)):
        corner_a, corner_b = pts3[idx[0]], pts3[idx[3]]
        c = 0.5 * (corner_a + corner_b)
        lo = 0.5 * (pts3[idx[4], 1] + pts3[idx[5], 1])
        up = 0.5 * (pts3[idx[1], 1] + pts3[idx[2], 1])
        c = c + np.array([f.gaze[0] * f.eye_w * 0.25, 0.5 * (lo + up) - c[1] + f.gaze[1] * f.eye_w, 0.04])
        irises3.append(c)
    irises3 = np.array(irises3)

    # Nose wings: short arcs rising from the nostril ends.
    wings3 = []
    for i, side in ((31, -1.0), (35, 1.0)):
        b = pts3[i]
        wings3.append(np.array([b + [side * 0.015, -0.17, -0.03], b + [side * 0.045, -0.08, -0.02], b]))

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
        scale=scale, up=up, right=r2 @ np.array([1.0, 0.0]),
        outline=px(outline3, True), jaw=px(jaw3, True), hair_back=px(hair_back3, True), cap=cap,
        ears=px(ears3), neck=px(neck3), body=px(body3), irises=px(irises3),
        wings=[px(w) for w in wings3],
    )
    # Ear and iris widths foreshorten with yaw; the near ear (away from the nose) widens.
    out['ear_axes'] = [(scale * (0.08 + 0.18 * max(0.0, math.sin(yaw) * -side_)), scale * 0.23)
                       for side_ in (-1.0, 1.0)]
    out['iris_axes'] = (scale * 0.21 * f.eye_w * abs(math.cos(yaw)) + 0.3,
                        scale * 0.21 * f.eye_w * abs(math.cos(f.pitch)) + 0.3)
    out['angle'] = -math.degrees(f.roll)
    return out


# ----------------------------------------------------------------------------- drawing helpers

_SPLINE_BASIS: dict[int, np.ndarray] = {}


def _spline(p: np.ndarray, closed: bool, n: int = 8) -> np.ndarray:
    """Catmull-Rom curve through every point of p (so landmarks lie exactly on drawn curves)."""
    p = np.asarray(p, np.float64)
    if len(p) < 3:
        return p
    basis = _SPLINE_BASIS.get(n)
    if basis is None:
        t = np.arange(n) / n
        basis = 0.5 * np.stack([-t + 2 * t ** 2 - t ** 3, 2 - 5 * t ** 2 + 3 * t ** 3,
                                t + 4 * t ** 2 - 3 * t ** 3, -t ** 2 + t ** 3], 1)  # [n, 4]
        _SPLINE_BASIS[n] = basis
    if closed:
        ext = np.concatenate([p[-1:], p, p[:2]])
    else:
        ext = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
    segs = len(ext) - 3
    win = np.stack([ext[0:segs], ext[1:segs + 1], ext[2:segs + 2], ext[3:segs + 3]])  # [4, segs, 2]
    c = (basis @ win.reshape(4, -1)).reshape(n, segs, 2).transpose(1, 0, 2).reshape(-1, 2)
    return c if closed else np.concatenate([c, p[-1:]])


def _fx(p) -> np.ndarray:
    return np.round(np.asarray(p) * 16.0).astype(np.int32).reshape(-1, 1, 2)


def _fill(img, p, colour):
    cv2.fillPoly(img, [_fx(p)], _colour(colour), cv2.LINE_AA, 4)


def _line(img, p, colour, thickness, closed=False):
    cv2.polylines(img, [_fx(p)], closed, _colour(colour), max(1, int(round(thickness))), cv2.LINE_AA, 4)


def _ellipse(img, centre, axes, angle, colour, thickness=-1):
    cv2.ellipse(img, tuple(int(v) for v in np.round(np.asarray(centre) * 16)),
                tuple(int(max(v, 0.5) * 16) for v in axes), float(angle), 0, 360,
                _colour(colour), thickness, cv2.LINE_AA, 4)


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


# ----------------------------------------------------------------------------- scene

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
        tex = _tile_crop(rng, 'cloud', h, w)
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
            pts = np.array([x, y]) + (q[4:4 + 2 * m].reshape(m, 2) - 0.5) * 2.5 * r
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
            cv2.polylines(img, list(_fx(lines).reshape(-1, 2, 1, 2)), False, c,
                          max(1, int(step * 0.4)), cv2.LINE_AA, 4)
        else:  # textured patch
            pw, ph = min(int(r * 2) + 1, w), min(int(r * 2) + 1, h)
            x0, y0 = int(np.clip(x, 0, w - pw)), int(np.clip(y, 0, h - ph))
            patch = _tile_crop(rng, 'fine' if q[3] < 0.5 else 'cloud', ph, pw)
            roi = img[y0:y0 + ph, x0:x0 + pw]
            cv2.addWeighted(roi, 0.4, patch, 0.6, 0, dst=roi)
    if rng.random() < 0.3:  # out of focus; blurred at half size, which is as good and 4x cheaper
        small = cv2.resize(img, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)
        cv2.GaussianBlur(small, (0, 0), rng.uniform(0.5, 2.0), dst=small)
        cv2.resize(small, (w, h), dst=img, interpolation=cv2.INTER_LINEAR)


def _draw_face(img: np.ndarray, f: SimpleNamespace, g: dict, features: bool = True):
    s = g['scale']
    lm = g['landmarks']
    skin = f.skin
    up = g['up']

    _fill(img, g['body'], f.clothes)
    _fill(img, g['neck'], skin * 0.72)
    long_hair = f.hair_style == 'long'
    if f.hair_style in ('short', 'long'):
        if not long_hair:
            _fill(img, g['hair_back'], f.hair)
    for k in range(2):
        ax = g['ear_axes'][k]
        c = g['ears'][k] + g['right'] * (-1 if k == 0 else 1) * ax[0] * 0.4
        _ellipse(img, c, ax, g['angle'], skin * 0.92)
        _ellipse(img, c, (ax[0] * 0.5, ax[1] * 0.6), g['angle'], skin * 0.75)
    if long_hair:
        _fill(img, g['hair_back'], f.hair)
    if f.shade < 1.0:
        # A darker rim on the side away from the light: the face polygon, then a smaller lit one.
        _fill(img, g['outline'], skin * f.shade)
        c = g['outline'].mean(0)
        lit = c + (g['outline'] - c) * 0.92 + np.array([math.cos(f.light), math.sin(f.light)]) * 0.04 * s
        _fill(img, lit, skin)
    else:
        _fill(img, g['outline'], skin)
    if f.jaw_line:
        _line(img, g['jaw'], skin * f.jaw_shade, max(1.0, 0.012 * s))
    if f.hair_style in ('short', 'long'):
        _fill(img, g['cap'], f.hair)
        _line(img, g['cap'], f.hair, 2)  # covers the anti-aliased seam along the face outline
    elif f.hair_style == 'hat':
        _fill(img, g['cap'], f.hat)
        _line(img, g['cap'], f.hat, 2)
        _line(img, g['cap'][len(g['cap']) // 2 - 10:len(g['cap']) // 2 + 11], f.hat * 0.6, 0.06 * s)
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
        contour = g['outline'].astype(np.float32).reshape(-1, 1, 2)
        if min(cv2.pointPolygonTest(contour, (float(q[0]), float(q[1])), False) for q in brow[[0, -1]]) < 0:
            # Far-side brow turned past the cheek: hide what is behind the outline.
            _blend_inside(img, g['outline'],
                          lambda layer, o, brow=brow: _fill(layer, brow - o, f.brow_colour))
        else:
            _fill(img, brow, f.brow_colour)

    # Eyes: sclera through the six contour points, iris clipped by the lids, lid lines on top.
    for k, idx in enumerate((RIGHT_EYE, LEFT_EYE)):
        ring = _spline(lm[idx], True, 8)
        upper = _spline(lm[idx[[0, 1, 2, 3]]], False, 8)  # corner, two upper-lid points, corner
        lower = _spline(lm[idx[[3, 4, 5, 0]]], False, 8)
        eye_h = float(np.abs(lm[idx[1:3]] - lm[idx[[5, 4]]]).max())
        if eye_h > 1.5:
            iris_c, axes = g['irises'][k], g['iris_axes']

            def paint(layer, origin, iris_c=iris_c, axes=axes):
                layer[...] = np.array(_colour(f.sclera), np.uint8)
                _ellipse(layer, iris_c - origin, axes, g['angle'], f.iris)
                _ellipse(layer, iris_c - origin, (axes[0] * 0.45, axes[1] * 0.45), g['angle'], f.iris * 0.2)
                if f.catchlight:
                    _ellipse(layer, iris_c - origin + (up + g['right']) * axes[1] * 0.3,
                             (axes[1] * 0.18, axes[1] * 0.18), 0, (250, 250, 250))
            _blend_inside(img, ring, paint)
        lash = f.brow_colour * 0.5
        if f.crease and eye_h > 1.5:
            _line(img, upper[2:-2] + up * (0.45 * eye_h + 0.02 * s), skin * 0.78, max(1.0, 0.008 * s))
        _line(img, upper, lash, max(1.0, 0.016 * s))
        _line(img, lower, skin * 0.55, max(1.0, 0.007 * s))

    # Nose: bridge line ending at the tip, tip highlight, nostril base curve, nostrils, wings.
    nose_c = skin * 0.62
    _line(img, _spline(lm[27:31], False, 6), skin * 0.75, max(1.0, 0.012 * s))
    _ellipse(img, lm[30] + up * 0.01 * s, (0.035 * s, 0.03 * s), g['angle'], np.minimum(skin * 1.12 + 8, 255))
    for i, j in ((31, 32), (34, 35)):
        m = 0.5 * (lm[i] + lm[j]) + up * 0.022 * s
        _ellipse(img, m, (0.04 * s, 0.018 * s), g['angle'], skin * 0.3)
    _line(img, _spline(lm[31:36], False, 6), nose_c, max(1.0, 0.013 * s))
    for w in g['wings']:
        _line(img, _spline(w, False, 6), skin * 0.7, max(1.0, 0.01 * s))
    if f.smile_lines:
        for i, j in ((31, 48), (35, 54)):
            a = lm[i] + (lm[i] - lm[33]) * 0.5
            b = lm[j] + (lm[j] - 0.5 * (lm[51] + lm[57])) * 0.12 - up * 0.05 * s
            _line(img, _spline(np.array([a, 0.5 * (a + b) + (lm[i] - lm[33]) * 0.25, b]), False, 6),
                  skin * 0.8, max(1.0, 0.008 * s))

    # Mouth: lips through the outer contour, cavity (teeth, tongue) through the inner one.
    outer = _spline(lm[OUTER_LIP], True, 6)
    inner = _spline(lm[INNER_LIP], True, 6)
    if f.moustache:
        # Between the nostrils and the upper lip, leaving both contours in sight.
        top = 0.55 * lm[31:36] + 0.45 * lm[49:54]
        bottom = _spline(lm[48:55], False, 4)[::-1] + up * 0.012 * s
        _fill(img, np.concatenate([lm[48:49] + up * 0.02 * s, top, lm[54:55] + up * 0.02 * s, bottom]),
              f.hair * 0.8)
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
                _ellipse(layer, m, (0.25 * np.linalg.norm(lm[64] - lm[60]), gap * 0.4), g['angle'],
                         (190, 90, 100))
            if f.teeth:
                band = up_inner - origin
                _fill(layer, np.concatenate([band, band[::-1] - up * min(gap * 0.45, 0.06 * s)]),
                      (240, 236, 225))
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
                lens = cv2.ellipse2Poly(tuple(int(v) for v in c), tuple(int(v) for v in axes),
                                        int(g['angle']), 0, 360, 10).astype(np.float64)
                _blend_inside(img, lens, tint)
            _ellipse(img, c, axes, g['angle'], f.glasses_colour, max(1, int(0.015 * s)))
        r_in = lm[39] + g['right'] * 0.3 * np.linalg.norm(lm[36] - lm[39])
        l_in = lm[42] - g['right'] * 0.3 * np.linalg.norm(lm[42] - lm[45])
        _line(img, [r_in, lm[27] + up * 0.03 * s, l_in], f.glasses_colour, max(1, 0.012 * s))


def _occluders(img, f, g, rng):
    lm = g['landmarks']
    s = g['scale']
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
            _line(img, [centre - d * r * 2, centre + d * r * 2], colour, rng.uniform(0.03, 0.15) * s)
        else:  # textured patch
            box = cv2.boxPoints((tuple(centre), (2 * r, 2 * r), ang))
            tex = _tile_crop(rng, 'cloud', img.shape[0], img.shape[1])

            def paint(layer, origin, box=box, colour=colour):
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
        cv2.line(kernel, (int(round(c - c * math.cos(ang))), int(round(c - c * math.sin(ang)))),
                 (int(round(c + c * math.cos(ang))), int(round(c + c * math.sin(ang)))), 1.0, 1)
        cv2.filter2D(img, -1, kernel / kernel.sum(), dst=img)
    amp = rng.uniform(0, 0.12 if hard else 0.06)
    if amp > 0.01:
        noise = _tile_crop(rng, 'fine', h, w)
        cv2.addWeighted(img, 1.0, noise, amp, -127.5 * amp, dst=img)
    if rng.random() < 0.04:
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        img[...] = grey[..., None]


def _render(rng: np.random.Generator | int, size: int | tuple[int, int] = 320, challenging: bool = False,
            features: bool = True, occluders: bool = True, degrade: bool = True,
            pose: tuple[float, float, float] | None = None):
    """render_face with switches for tests; returns (image, landmarks, face parameters).

    Each stage draws from its own generator, so switching a stage off leaves the others unchanged.
    pose = (yaw, pitch, roll) in degrees replaces the sampled pose.
    """
    rng = _as_rng(rng)
    height, width = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    seeds = rng.integers(0, 2 ** 63, 5)
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
    return img, g['landmarks'].astype(np.float32), f


def render_face(rng: np.random.Generator | int, size: int | tuple[int, int] = 320,
                challenging: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic face: (RGB uint8 image [H, W, 3], landmarks float32 [68, 2], 0-based pixels).

    size is the side of a square image or (height, width). challenging draws iBUG-like faces:
    wider poses, stronger expressions, more occluders, blur and harsher lighting.
    """
    img, lm, _ = _render(rng, size, challenging)
    return img, lm


def sources(num_train: int, num_test: int, seed: int = 0, size: int = 160
                      ) -> dict[str, list[dict]]:
    """In-memory 68-point synthetic faces {'train', 'test'} in the TFDS feature layout (what
    `train_and_evaluate(sources=...)` takes: no build, the crop is the whole image)."""
    from fan_jax import geometry

    def make(n: int, stream: int) -> list[dict]:
        out = []
        for i in range(n):
            img, lm = render_face(image_rng(seed, i, stream), size)
            lm = lm.astype(np.float32)
            out.append({"image": img, "landmarks": lm,
                        "box": geometry.box_from_landmarks(lm).astype(np.float32),
                        "to_original": np.eye(2, 3, dtype=np.float32),
                        "original_landmarks": lm, "file_name": f"synthetic_{stream}_{i}"})
        return out

    return {"train": make(num_train, 101), "test": make(num_test, 102)}


# ----------------------------------------------------------------------------- preview / CLI

def draw_landmarks(img: np.ndarray, landmarks: np.ndarray, numbers: bool = False) -> np.ndarray:
    """A copy of img with the 68 points drawn, one colour per part (for eyeballing)."""
    out = img.copy()
    groups = [(JAW, (255, 255, 0)), (RIGHT_BROW, (255, 0, 0)), (LEFT_BROW, (0, 0, 255)),
              (NOSE_BRIDGE, (0, 255, 0)), (NOSTRILS, (0, 255, 255)), (RIGHT_EYE, (255, 0, 0)),
              (LEFT_EYE, (0, 0, 255)), (OUTER_LIP, (255, 0, 255)), (INNER_LIP, (255, 128, 0))]
    for idx, c in groups:
        for i in idx:
            cv2.circle(out, tuple(int(v) for v in np.round(landmarks[i] * 4)), 8, c, -1, cv2.LINE_AA, 2)
            if numbers:
                cv2.putText(out, str(i), tuple(int(v) + 2 for v in landmarks[i]), cv2.FONT_HERSHEY_PLAIN,
                            0.6, c, 1, cv2.LINE_AA)
    return out


def write_preview(path: str, num: int = 12, seed: int = 0, size: int = 256, cols: int = 4,
                  challenging: bool = False, numbers: bool = False) -> np.ndarray:
    """A grid of faces with their landmarks drawn, saved as an image; returns the grid (RGB)."""
    tiles = []
    for i in range(num):
        img, lm = render_face(image_rng(seed, i, 99), size, challenging)
        tiles.append(np.concatenate([img, draw_landmarks(img, lm, numbers)], 1))
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[r:r + cols], 1) for r in range(0, len(tiles), cols)]
    grid = np.concatenate(rows, 0)
    cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return grid


def main(argv: list[str] | None = None) -> dict[str, int]:
    """`python -m fan_jax.synthetic` writes a 300W tree (fan_jax.synthetic_300w)."""
    from fan_jax import synthetic_300w

    return synthetic_300w.main(argv)


if __name__ == '__main__':
    main()
