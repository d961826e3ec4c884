"""The 68-point (300W / iBUG) markup of the synthetic faces: the count and each part's indices."""

from __future__ import annotations

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
