"""Sampling one synthetic face: identity, expression, pose and appearance."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from fan_jax.synthetic.parts import NUM_LANDMARKS

_SKIN = np.array(
    [
        (255, 226, 200),
        (241, 196, 168),
        (224, 172, 128),
        (198, 136, 90),
        (160, 104, 70),
        (120, 76, 52),
        (86, 56, 40),
    ],
    np.float64,
)
_HAIR = np.array(
    [
        (28, 24, 22),
        (62, 42, 30),
        (110, 74, 46),
        (180, 140, 90),
        (225, 196, 130),
        (150, 70, 38),
        (150, 150, 150),
        (225, 225, 222),
    ],
    np.float64,
)
_HAIR_P = np.array([0.3, 0.22, 0.15, 0.08, 0.08, 0.07, 0.06, 0.04])
_IRIS = np.array(
    [
        (70, 45, 25),
        (110, 70, 35),
        (60, 100, 150),
        (70, 120, 80),
        (120, 100, 50),
        (110, 120, 125),
        (40, 28, 20),
    ],
    np.float64,
)


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
    f.eye_up = u(0.26, 0.38)  # upper lid height / eye width at openness 1
    f.eye_lo = u(0.10, 0.17)  # lower lid depth / eye width
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
    f.hair_style = rng.choice(["bald", "short", "long", "hat"], p=[0.08, 0.47, 0.37, 0.08])
    f.hair_volume = u(1.04, 1.16) if f.hair_style != "long" else u(1.12, 1.35)
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
            rng.integers(4)
        ] * u(0.8, 1.1)
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
