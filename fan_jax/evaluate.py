"""Evaluation: heatmaps -> landmarks in the original image -> NME, FR@0.1, AUC@0.1, CED plots.

Every test split is scored with and without flip-test from the same two forward passes
(the image and its mirror), so flip-test costs one extra forward, not a second pass over
the data. Landmarks are compared in the original image's frame: the crop's inverse
affine (carried by each eval batch as `crop_to_original`) maps decoded heatmap peaks back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from fan_jax import geometry, heatmaps, metrics

PredictFn = Callable[[np.ndarray], Any]  # images [B,H,W,3] -> heatmaps [B,h,w,L]


def landmarks_from_heatmaps(hm: Any, crop_to_original: np.ndarray, input_size: int) -> np.ndarray:
    """Decodes heatmaps and maps the peaks to original-image pixel coordinates."""
    stride = input_size / hm.shape[1]
    crop_pts = np.asarray(heatmaps.from_heatmap_coords(heatmaps.decode(hm), stride=stride))
    return geometry.apply_affine(np.asarray(crop_to_original, np.float64), crop_pts)


def predict_split(
    predict_fn: PredictFn, batches: Iterable[Mapping[str, np.ndarray]], flip_perm: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Runs the model over one split; returns predictions (plain and flip-tested) and truth.

    Batches carry 'image', 'crop_to_original', 'original_landmarks' and optionally 'valid'
    (padding mask for the last batch).
    """
    plain, flipped, truth, crops, to_crop = [], [], [], [], []
    for batch in batches:
        images = np.asarray(batch["image"])
        valid = np.asarray(batch.get("valid", np.ones(len(images), bool)), bool)
        to_orig = np.asarray(batch["crop_to_original"])
        hm = np.asarray(predict_fn(images))
        size = images.shape[1]
        plain.append(landmarks_from_heatmaps(hm, to_orig, size)[valid])
        if flip_perm is not None:
            hm_mirror = np.asarray(predict_fn(images[:, :, ::-1]))
            hm_avg = 0.5 * (hm + np.asarray(heatmaps.flip_heatmaps(hm_mirror, flip_perm)))
            flipped.append(landmarks_from_heatmaps(hm_avg, to_orig, size)[valid])
        truth.append(np.asarray(batch["original_landmarks"])[valid])
        crops.append(images[valid])
        to_crop.append(np.stack([geometry.invert_affine(m) for m in to_orig[valid]]))
    out = {"plain": np.concatenate(plain), "truth": np.concatenate(truth)}
    if flipped:
        out["flip"] = np.concatenate(flipped)
    out["crops"] = np.concatenate(crops)
    out["original_to_crop"] = np.concatenate(to_crop)
    return out


def score(pred: np.ndarray, truth: np.ndarray, dataset: str, normalizer: str) -> dict[str, Any]:
    """NME (fraction), FR@0.1 and AUC@0.1 for one split and one prediction setting."""
    norm = metrics.normalizer_distances(truth, dataset, normalizer)
    nmes = metrics.nme(pred, truth, norm)
    return {
        "nme": float(np.mean(nmes)),
        "fr": float(metrics.failure_rate(nmes, 0.1)),
        "auc": float(metrics.auc(nmes, 0.1)),
        "normalizer": normalizer,
        "num_images": int(len(nmes)),
        "per_image_nme": nmes,
    }


def evaluate_splits(
    predict_fn: PredictFn,
    split_batches: Mapping[str, Callable[[], Iterable[Mapping[str, np.ndarray]]]],
    dataset: str,
    normalizer: str,
    flip_perm: np.ndarray | None,
    out_dir: str | None = None,
    model_name: str = "model",
) -> dict[str, dict[str, dict[str, Any]]]:
    """Scores every split, with and without flip-test; writes metrics.json and plots to out_dir.

    `split_batches[name]()` returns a fresh iterable of eval batches for that split.
    Returns {split: {'no_flip' | 'flip': {'nme','fr','auc','normalizer','num_images'}}}.
    """
    results: dict[str, dict[str, dict[str, Any]]] = {}
    curves: dict[str, np.ndarray] = {}
    grid = None
    for split, make_batches in split_batches.items():
        preds = predict_split(predict_fn, make_batches(), flip_perm)
        results[split] = {"no_flip": score(preds["plain"], preds["truth"], dataset, normalizer)}
        best = preds["plain"]
        if "flip" in preds:
            results[split]["flip"] = score(preds["flip"], preds["truth"], dataset, normalizer)
            best = preds["flip"]
        curves[split] = results[split]["flip" if "flip" in preds else "no_flip"]["per_image_nme"]
        if grid is None and len(preds["crops"]):
            grid = (preds, best, split)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(strip_per_image(results), f, indent=2)
        plot_ced(curves, os.path.join(out_dir, f"ced_{dataset}.png"), f"{model_name} on {dataset}")
        if grid is not None:
            preds, best, split = grid
            to_crop = preds["original_to_crop"]
            plot_landmark_grid(
                preds["crops"],
                geometry.apply_affine(to_crop, preds["truth"]),
                geometry.apply_affine(to_crop, best),
                os.path.join(out_dir, f"faces_{split}.png"),
            )
    return strip_per_image(results)


def strip_per_image(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict:
    """Drops the per-image arrays so the results serialise to JSON."""
    return {
        split: {k: {f: v for f, v in r.items() if f != "per_image_nme"} for k, r in per.items()}
        for split, per in results.items()
    }


def format_table(rows: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> str:
    """Table of NME (%), FR@0.1 (%) and AUC@0.1 for {model: {split: {setting: metrics}}}."""
    w = max([22] + [len(m) + 2 for m in rows])
    lines = [f"{'model':<{w}}{'split':<20}{'flip':<6}{'NME %':>8}{'FR %':>8}{'AUC':>8}{'N':>6}"]
    for model, splits in rows.items():
        for split, settings in splits.items():
            for setting, m in settings.items():
                lines.append(
                    f"{model:<{w}}{split:<20}{'yes' if setting == 'flip' else 'no':<6}"
                    f"{100 * m['nme']:>8.2f}{100 * m['fr']:>8.2f}{m['auc']:>8.4f}{m['num_images']:>6}"
                )
    return "\n".join(lines)


def plot_ced(curves: Mapping[str, np.ndarray], path: str, title: str, threshold: float = 0.1) -> None:
    """Cumulative error distribution per split, written as a PNG."""
    # A bare Figure renders to files without pyplot, leaving the caller's backend alone
    # (a notebook's inline plots keep working).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=120)
    ax = fig.subplots()
    for split, nmes in curves.items():
        x, y = metrics.ced(np.asarray(nmes), threshold)
        ax.plot(100 * x, y, label=f"{split} (AUC {metrics.auc(np.asarray(nmes), threshold):.3f})")
    ax.set_xlabel("NME (%)")
    ax.set_ylabel("fraction of images")
    ax.set_xlim(0, 100 * threshold)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_landmark_grid(
    images: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: str, max_faces: int = 16
) -> None:
    """Grid of crops with true (green) and predicted (red) landmarks."""
    # A bare Figure renders to files without pyplot, leaving the caller's backend alone
    # (a notebook's inline plots keep working).
    from matplotlib.figure import Figure

    n = min(max_faces, len(images))
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(2.5 * cols, 2.5 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(np.clip(images[i], 0, 255).astype(np.uint8))
        ax.scatter(truth[i, :, 0], truth[i, :, 1], s=3, c="lime", label="truth")
        ax.scatter(pred[i, :, 0], pred[i, :, 1], s=3, c="red", label="prediction")
    axes.flat[0].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
