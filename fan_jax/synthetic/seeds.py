"""Randomness of the synthetic faces: every image from its own (seed, subset, index) generator,
and the 300W folders with their seed streams (`SUBSETS`)."""

from __future__ import annotations

import numpy as np

# (folder, split, share of its split in the real 300W, extension, seed stream id).
SUBSETS = (
    ("afw", "train", 337, ".jpg", 1),
    ("helen/trainset", "train", 2000, ".jpg", 2),
    ("lfpw/trainset", "train", 811, ".png", 3),
    ("helen/testset", "common", 330, ".jpg", 4),
    ("lfpw/testset", "common", 224, ".png", 5),
    ("ibug", "challenging", 135, ".jpg", 6),
)


def image_rng(seed: int, index: int, subset: int = 0) -> np.random.Generator:
    """The generator of one image: independent of every other (seed, subset, index)."""
    return np.random.default_rng([int(seed), int(subset), int(index)])


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(int(rng))
