"""Heatmap and distillation losses (pure jnp; jit or not). Taps are NHWC [B, H, W, C].

Teacher inputs pass through stop_gradient, so no gradient ever reaches the frozen teacher.

Feature similarity (REFERENCE section 2): with f_i the channel vector at position i of an
N = H*W tap, a_ij = cos(f_i, f_j) and L_FS = sum_ij (a^s_ij - a^t_ij)^2 / N^2, averaged
over the batch. Both forms here normalise rows first, f^_i = f_i / (|f_i| + eps), and take
a_ij = f^_i . f^_j, so the direct N x N form and the Gram form are the same function. The
public code divides by |f_i||f_j| + eps instead, which does not factor into per-row terms;
the two differ by eps * (|f_i| + |f_j|) + eps^2 in the denominator, i.e. only for rows with
norm near eps (`feature_similarity_public` keeps the public formula for comparison).
An all-zero row normalises to zero (cosine 0 with everything, as in the public formula)
and passes no gradient: a plain |f| has a NaN gradient at 0, and f / (|f| + eps) has one
of size 1/eps there. (The public code's gradient at a zero row is of size 1/eps.) Taps are
post-ReLU, so a zero row gets no gradient through the ReLU anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def heatmap_mse(pred: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """Mean squared error over all elements (the public code's plain mean)."""
    target = lax.stop_gradient(target)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def feature_aligned(adapted_student: jnp.ndarray, teacher: jnp.ndarray) -> jnp.ndarray:
    """FA loss: MSE between the adapted student tap and the (frozen) teacher tap, same shape."""
    if adapted_student.shape != teacher.shape:
        raise ValueError(f"FA shapes differ: {adapted_student.shape} vs {teacher.shape}")
    teacher = lax.stop_gradient(teacher)
    return jnp.mean(jnp.square(adapted_student.astype(jnp.float32) - teacher.astype(jnp.float32)))


def _safe_norm(x: jnp.ndarray) -> jnp.ndarray:
    """L2 norm over the last axis whose gradient at the zero vector is 0, not NaN."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    nonzero = sq > 0
    # Double where: the untaken branch must also have a finite gradient.
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def _rows(tap: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C] -> [B, N, C] float32."""
    b, h, w, c = tap.shape
    return tap.astype(jnp.float32).reshape(b, h * w, c)


def _normalised_rows(tap: jnp.ndarray, eps: float) -> jnp.ndarray:
    """Rows f / (|f| + eps); an exactly-zero row stays zero with a zero gradient."""
    f = _rows(tap)
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    nonzero = sq > 0
    # Without the outer where, d(f / (|f| + eps))/df at f = 0 is I / eps (~1e9): finite but
    # large enough to wreck an SGD step. Both where branches have finite gradients.
    norm = jnp.sqrt(jnp.where(nonzero, sq, 1.0))
    return jnp.where(nonzero, f / (norm + eps), 0.0)


def _check_taps(student: jnp.ndarray, teacher: jnp.ndarray) -> None:
    if student.ndim != 4 or teacher.ndim != 4 or student.shape[:3] != teacher.shape[:3]:
        raise ValueError(
            f"FS needs [B,H,W,C] taps with equal B,H,W: {student.shape} vs {teacher.shape}"
        )


def feature_similarity_direct(
    student: jnp.ndarray, teacher: jnp.ndarray, eps: float = 1e-9
) -> jnp.ndarray:
    """FS loss via the explicit N x N cosine matrices (the reference; O(N^2) memory)."""
    _check_taps(student, teacher)
    s = _normalised_rows(student, eps)
    t = _normalised_rows(lax.stop_gradient(teacher), eps)
    a_s = jnp.einsum("bic,bjc->bij", s, s, precision=_HIGHEST)
    a_t = jnp.einsum("bic,bjc->bij", t, t, precision=_HIGHEST)
    n = s.shape[1]
    return jnp.mean(jnp.sum(jnp.square(a_s - a_t), axis=(1, 2)) / (n * n))


def feature_similarity_gram(
    student: jnp.ndarray, teacher: jnp.ndarray, eps: float = 1e-9
) -> jnp.ndarray:
    """FS loss via C x C Gram matrices: (|S^T S|^2 + |T^T T|^2 - 2 |S^T T|^2) / N^2.

    Exact rewrite of the direct form (sum_ij ((SS^T)_ij - (TT^T)_ij)^2 = trace of the square
    of SS^T - TT^T, expanded with the cyclic trace). The three terms cancel heavily, so every
    matmul runs at full float32 (Precision.HIGHEST), which matters on TPU/GPU.
    """
    _check_taps(student, teacher)
    s = _normalised_rows(student, eps)
    t = _normalised_rows(lax.stop_gradient(teacher), eps)
    g_ss = jnp.einsum("bnc,bnd->bcd", s, s, precision=_HIGHEST)
    g_tt = jnp.einsum("bnc,bnd->bcd", t, t, precision=_HIGHEST)
    g_st = jnp.einsum("bnc,bnd->bcd", s, t, precision=_HIGHEST)
    total = (
        jnp.sum(jnp.square(g_ss), axis=(1, 2))
        + jnp.sum(jnp.square(g_tt), axis=(1, 2))
        - 2.0 * jnp.sum(jnp.square(g_st), axis=(1, 2))
    )
    n = s.shape[1]
    return jnp.mean(total / (n * n))


def feature_similarity_public(
    student: jnp.ndarray, teacher: jnp.ndarray, eps: float = 1e-9
) -> jnp.ndarray:
    """The public code's formula, a_ij = f_i.f_j / (|f_i||f_j| + eps); reference only (N x N)."""
    _check_taps(student, teacher)

    def cosines(tap: jnp.ndarray) -> jnp.ndarray:
        f = _rows(tap)
        norm = _safe_norm(f)[..., 0]
        dots = jnp.einsum("bic,bjc->bij", f, f, precision=_HIGHEST)
        return dots / (norm[:, :, None] * norm[:, None, :] + eps)

    n = student.shape[1] * student.shape[2]
    diff = cosines(student) - cosines(lax.stop_gradient(teacher))
    return jnp.mean(jnp.sum(jnp.square(diff), axis=(1, 2)) / (n * n))


FS_FORMS = {
    "gram": feature_similarity_gram,
    "direct": feature_similarity_direct,
    "public": feature_similarity_public,
}


def distillation_terms(
    student_taps: Sequence[jnp.ndarray],
    adapted_taps: Sequence[jnp.ndarray] | None,
    teacher_taps: Sequence[jnp.ndarray],
    fa_layers: Sequence[bool] = (True, True, True),
    fs_layers: Sequence[bool] = (True, True, True),
    fs_form: str = "gram",
) -> dict[str, jnp.ndarray]:
    """Per-tap FA and FS losses, keyed 'fa1'..'fa3', 'fs1'..'fs3' (enabled ones only).

    FA compares adapted student taps with teacher taps; FS compares the raw student taps
    (no adapter) with teacher taps. adapted_taps may be None when no FA layer is enabled.
    """
    if fs_form not in FS_FORMS:
        raise ValueError(f"fs_form must be one of {sorted(FS_FORMS)}, got {fs_form!r}")
    fs_fn = FS_FORMS[fs_form]
    terms: dict[str, jnp.ndarray] = {}
    for r, (fa_on, fs_on) in enumerate(zip(fa_layers, fs_layers, strict=True)):
        if fa_on:
            if adapted_taps is None:
                raise ValueError("FA is enabled but adapted_taps is None")
            terms[f"fa{r + 1}"] = feature_aligned(adapted_taps[r], teacher_taps[r])
        if fs_on:
            terms[f"fs{r + 1}"] = fs_fn(student_taps[r], teacher_taps[r])
    return terms


def total_loss(
    heatmap_loss: jnp.ndarray, terms: Mapping[str, jnp.ndarray], lam: float
) -> jnp.ndarray:
    """L = L_heatmap + lam * sum of the distillation terms."""
    if not terms:
        return heatmap_loss
    return heatmap_loss + lam * sum(terms.values())
