"""Active shape model (PCA point distribution model) for the KD-Loss soft landmarks.

The Tolerant teacher trains on *soft landmarks*: each ground-truth shape projected onto a PCA
model of the training shapes that keeps `variance_percent` of the variance, with every mode
coefficient clipped to +-clip_sigmas * sqrt(eigenvalue). Following the public code
(pca_utility.py: sklearn PCA(n_components=k/100) on the augmented training shapes, then
calculate_b_vector), shapes are flattened as (x0, y0, x1, y1, ...), eigenvalues are the
sample variances (N - 1 denominator), and the number of modes is the smallest whose
cumulative explained-variance ratio exceeds k/100 (sklearn's rule). 100% keeps every mode
with non-zero variance.

Fitting is numpy float64 and deterministic: an eigendecomposition of the covariance with each
eigenvector's sign fixed (largest-magnitude entry positive). The model is a small npz
(`save` / `load`) stored with the Tolerant teacher; `project_jnp` applies it on device.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 1
# Eigenvalues below this fraction of the largest are numerical zeros (rank deficiency).
_RANK_RTOL = 1e-10


@dataclasses.dataclass(frozen=True, eq=False)
class ShapeModel:
    """mean [2L], components [k, 2L] (orthonormal rows), eigenvalues [k] (descending)."""

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    variance_percent: float = 97.0
    clip_sigmas: float = 3.0

    @property
    def num_landmarks(self) -> int:
        return self.mean.shape[0] // 2

    @property
    def num_modes(self) -> int:
        return self.components.shape[0]

    @property
    def limits(self) -> np.ndarray:
        """Per-mode clip bound clip_sigmas * sqrt(eigenvalue)."""
        return self.clip_sigmas * np.sqrt(self.eigenvalues)

    def _flat(self, shapes: np.ndarray) -> np.ndarray:
        shapes = np.asarray(shapes, np.float64)
        if shapes.shape[-2:] != (self.num_landmarks, 2):
            raise ValueError(f"shapes {shapes.shape}: expected [..., {self.num_landmarks}, 2]")
        return shapes.reshape(*shapes.shape[:-2], -1)

    def coefficients(self, shapes: np.ndarray, clip: bool = True) -> np.ndarray:
        """Mode coefficients b [..., k] of shapes [..., L, 2], clipped to the limits."""
        b = (self._flat(shapes) - self.mean) @ self.components.T
        return np.clip(b, -self.limits, self.limits) if clip else b

    def reconstruct(self, b: np.ndarray) -> np.ndarray:
        """Shapes [..., L, 2] from coefficients [..., k]."""
        flat = self.mean + np.asarray(b, np.float64) @ self.components
        return flat.reshape(*flat.shape[:-1], self.num_landmarks, 2)

    def project(self, shapes: np.ndarray, clip: bool = True) -> np.ndarray:
        """Soft landmarks: shapes [..., L, 2] projected onto the model (float64 numpy)."""
        return self.reconstruct(self.coefficients(shapes, clip))

    def project_jnp(self, shapes, clip: bool = True):
        """`project` in jnp (float32), for use inside a jitted step."""
        dtype = jnp.result_type(shapes)
        mean = jnp.asarray(self.mean, dtype)
        comps = jnp.asarray(self.components, dtype)
        lim = jnp.asarray(self.limits, dtype)
        flat = shapes.reshape(*shapes.shape[:-2], -1)
        b = jnp.matmul(flat - mean, comps.T, precision="highest")
        if clip:
            b = jnp.clip(b, -lim, lim)
        out = mean + jnp.matmul(b, comps, precision="highest")
        return out.reshape(shapes.shape)

    def save(self, path: str | os.PathLike) -> None:
        """Writes an npz (the path is used as given; gs:// works)."""
        from etils import epath

        with epath.Path(path).open("wb") as f:
            np.savez(
                f,
                mean=self.mean,
                components=self.components,
                eigenvalues=self.eigenvalues,
                variance_percent=np.float64(self.variance_percent),
                clip_sigmas=np.float64(self.clip_sigmas),
                format_version=np.int64(FORMAT_VERSION),
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShapeModel:
        from etils import epath

        with epath.Path(path).open("rb") as f, np.load(f) as z:
            version = int(z["format_version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"{path}: ASM format version {version}, expected {FORMAT_VERSION}")
            return cls(
                mean=z["mean"],
                components=z["components"],
                eigenvalues=z["eigenvalues"],
                variance_percent=float(z["variance_percent"]),
                clip_sigmas=float(z["clip_sigmas"]),
            )


def fit(shapes: np.ndarray, variance_percent: float = 97.0, clip_sigmas: float = 3.0) -> ShapeModel:
    """PCA shape model of training shapes [N, L, 2] keeping `variance_percent` (0, 100]."""
    shapes = np.asarray(shapes, np.float64)
    if shapes.ndim != 3 or shapes.shape[-1] != 2:
        raise ValueError(f"shapes must be [N, L, 2], got {shapes.shape}")
    if not 0 < variance_percent <= 100:
        raise ValueError(f"variance_percent must be in (0, 100], got {variance_percent}")
    n = shapes.shape[0]
    if n < 2:
        raise ValueError("need at least two shapes")
    if not np.all(np.isfinite(shapes)):
        raise ValueError("shapes contain NaN or Inf")
    x = shapes.reshape(n, -1)
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / (n - 1)
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    rank = int(np.sum(eigvals > _RANK_RTOL * max(eigvals[0], 0.0))) if eigvals[0] > 0 else 0
    if rank == 0:
        raise ValueError("all training shapes are identical")
    eigvals, eigvecs = eigvals[:rank], eigvecs[:, :rank]
    if variance_percent >= 100:
        k = rank
    else:
        ratio_cumsum = np.cumsum(eigvals) / np.sum(eigvals)
        k = min(
            int(np.searchsorted(ratio_cumsum, variance_percent / 100.0, side="right")) + 1, rank
        )
    comps = eigvecs[:, :k].T
    # Deterministic signs: each mode's largest-magnitude entry is positive.
    idx = np.argmax(np.abs(comps), axis=1)
    signs = np.sign(comps[np.arange(k), idx])
    comps = comps * signs[:, None]
    return ShapeModel(
        mean=mean,
        components=np.ascontiguousarray(comps),
        eigenvalues=eigvals[:k].copy(),
        variance_percent=float(variance_percent),
        clip_sigmas=float(clip_sigmas),
    )
