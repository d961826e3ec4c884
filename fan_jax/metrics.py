"""Landmark metrics (numpy): NME, failure rate, AUC and the CED curve.

NMEs are fractions (0.05 = 5%); multiply by 100 to report percent.
"""

from __future__ import annotations

import numpy as np

# 0-based landmark indices. An int side is one point; a tuple side is the mean of its points.
NORMALIZERS: dict[tuple[str, str], tuple] = {
    ("wflw", "inter_ocular"): (60, 72),
    ("wflw", "inter_pupil"): (96, 97),
    ("300w", "inter_ocular"): (36, 45),
    ("300w", "inter_pupil"): (tuple(range(36, 42)), tuple(range(42, 48))),
    ("cofw", "inter_ocular"): (8, 9),
    ("cofw", "inter_pupil"): (16, 17),
}

# The TFDS builder is named 'the300w'; accept it for the metric key too.
_DATASET_ALIASES = {"the300w": "300w"}


def _side(gt: np.ndarray, side: int | tuple[int, ...]) -> np.ndarray:
    if isinstance(side, tuple):
        return gt[:, list(side), :].mean(axis=1)
    return gt[:, side, :]


def normalizer_distances(gt: np.ndarray, dataset: str, kind: str = "inter_ocular") -> np.ndarray:
    """Per-image normalising distance [N] from ground truth [N, L, 2] (see NORMALIZERS)."""
    name = dataset.lower()
    key = (_DATASET_ALIASES.get(name, name), kind)
    if key not in NORMALIZERS:
        raise ValueError(f"unknown normaliser {key}; known: {sorted(NORMALIZERS)}")
    gt = np.asarray(gt, dtype=np.float64)
    a, b = NORMALIZERS[key]
    return np.linalg.norm(_side(gt, a) - _side(gt, b), axis=-1)


def nme(pred: np.ndarray, gt: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Per-image NME [N]: mean over landmarks of the Euclidean (not squared) error / norm."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ")
    err = np.linalg.norm(pred - gt, axis=-1).mean(axis=-1)
    return err / np.asarray(norm, dtype=np.float64)


def failure_rate(nmes: np.ndarray, threshold: float = 0.1) -> float:
    """Share of images with NME > threshold (FR@threshold, a fraction)."""
    nmes = np.asarray(nmes, dtype=np.float64)
    return float(np.mean(nmes > threshold))


def ced(
    nmes: np.ndarray, threshold: float = 0.1, step: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative error distribution: x = 0, step, ..., threshold; y(x) = share of NME <= x."""
    nmes = np.sort(np.asarray(nmes, dtype=np.float64).ravel())
    num = int(round(threshold / step))
    x = np.linspace(0.0, threshold, num + 1)  # linspace: the last point is exactly threshold
    y = np.searchsorted(nmes, x, side="right") / max(len(nmes), 1)
    return x, y


def auc(nmes: np.ndarray, threshold: float = 0.1, step: float = 1e-4) -> float:
    """AUC@threshold: trapezoid-rule integral of the CED over [0, threshold], divided by threshold.

    With the defaults the CED is sampled at 1001 points (0, 1e-4, ..., 0.1). Some toolkits
    use Simpson's rule instead; the two differ by O(step).
    """
    x, y = ced(nmes, threshold, step)
    return float(np.trapezoid(y, x) / threshold)


def summarize(nmes: np.ndarray, threshold: float = 0.1) -> dict[str, float]:
    """Mean NME (fraction), FR and AUC at one threshold, as a dict."""
    nmes = np.asarray(nmes, dtype=np.float64)
    return {
        "nme": float(np.mean(nmes)),
        f"fr@{threshold:g}": failure_rate(nmes, threshold),
        f"auc@{threshold:g}": auc(nmes, threshold),
    }
