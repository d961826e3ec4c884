"""Evaluation: one evaluator over the landmarks function, for every model kind.

`Evaluator(kind, model, flip_perm)` jits `fan_jax.landmarks.landmarks_with_flip` over this
host's devices: forward, decode and flip-test run on the device, and only landmarks
[B, L, 2] come back. Every test split is scored with and without flip-test from the same two
forward passes (the image and its mirror). Landmarks are compared in the original image's
frame: the crop's inverse affine (carried by each eval batch as `crop_to_original`) maps
them back. `evaluate(...)` scores a config's test splits and writes metrics.json, the CED
curves and a landmark grid to <workdir>/eval.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fan_jax import compiler, geometry, landmarks, metrics

PyTree = Any
Source = Sequence[Mapping[str, Any]]
# uint8 crops [B, S, S, 3] -> (landmarks, flip-tested landmarks or None), crop pixels [B, L, 2]
PredictFn = Callable[[np.ndarray], tuple[Any, Any]]


class Evaluator:
    """Host-local, data-parallel landmarks of one model: `evaluator(variables)` is a PredictFn.

    Runs over this host's devices only, so evaluation needs no collective: on a pod every
    host scores the full split and they agree. Compiled once per model and batch shape.
    """

    def __init__(self, kind: str, model: Any, flip_perm: np.ndarray | None = None):
        local = jax.local_devices()
        mesh = Mesh(np.asarray(local), ("batch",))
        self._repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
        self._n_dev = len(local)
        fn = functools.partial(
            landmarks.landmarks_with_flip,
            kind,
            model,
            flip_perm=None if flip_perm is None else np.asarray(flip_perm),
        )
        self._fn = jax.jit(
            fn,
            in_shardings=(self._repl, data),
            out_shardings=data,
            compiler_options=compiler.compiler_options("predict"),
        )

    def __call__(self, variables: PyTree) -> PredictFn:
        # A replicated global array is not addressable as a whole on a pod: take this
        # host's copy.
        host_vars = jax.tree.map(
            lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, variables
        )
        host_vars = jax.device_put(host_vars, self._repl)

        def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            images = np.asarray(images)
            n = len(images)
            pad = (-n) % self._n_dev
            if pad:
                images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
            plain, flipped = self._fn(host_vars, images)
            return (np.asarray(plain)[:n], None if flipped is None else np.asarray(flipped)[:n])

        return predict


def predict_split(
    predict_fn: PredictFn, batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Runs the model over one split; returns predictions (plain and flip-tested, in the
    original images' pixels) and truth.

    Batches carry 'image', 'crop_to_original', 'original_landmarks' and optionally 'valid'
    (padding mask for the last batch).
    """
    plain, flipped, truth, crops, to_crop = [], [], [], [], []
    for batch in batches:
        images = np.asarray(batch["image"])
        valid = np.asarray(batch.get("valid", np.ones(len(images), bool)), bool)
        to_orig = np.asarray(batch["crop_to_original"], np.float64)
        pts, pts_flip = predict_fn(images)
        plain.append(geometry.apply_affine(to_orig, np.asarray(pts, np.float64))[valid])
        if pts_flip is not None:
            flipped.append(geometry.apply_affine(to_orig, np.asarray(pts_flip, np.float64))[valid])
        truth.append(np.asarray(batch["original_landmarks"])[valid])
        crops.append(images[valid])
        to_crop.append(
            geometry.invert_affine(to_orig[valid]) if valid.any() else np.zeros((0, 2, 3))
        )
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
        preds = predict_split(predict_fn, make_batches())
        results[split] = {"no_flip": score(preds["plain"], preds["truth"], dataset, normalizer)}
        best = preds["plain"]
        if "flip" in preds:
            results[split]["flip"] = score(preds["flip"], preds["truth"], dataset, normalizer)
            best = preds["flip"]
        curves[split] = results[split]["flip" if "flip" in preds else "no_flip"]["per_image_nme"]
        if grid is None and len(preds["crops"]):
            grid = (preds, best, split)
    if out_dir:
        epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
        (epath.Path(out_dir) / "metrics.json").write_text(
            json.dumps(strip_per_image(results), indent=2)
        )
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


def save_figure(fig: Any, path: str) -> None:
    """Writes a matplotlib figure as PNG to a local or gs:// path."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    epath.Path(path).write_bytes(buf.getvalue())


def plot_ced(
    curves: Mapping[str, np.ndarray], path: str, title: str, threshold: float = 0.1
) -> None:
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
    save_figure(fig, path)


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
    save_figure(fig, path)


# --------------------------------------------------------------------------- a config's splits


def eval_batches_fn(
    config: Any, source: Source
) -> Callable[[], Iterable[Mapping[str, np.ndarray]]]:
    """A fresh iterable of the config's eval crops of `source`, each time it is called."""
    from fan_jax import input_pipeline

    a = config.augment
    return lambda: input_pipeline.eval_batches(
        source,
        config.eval.batch_size,
        output_size=config.input_size,
        box_source=a.box_source,
        box_scale=a.box_scale,
        shard_index=0,
        shard_count=1,
    )


def validation_nme(config: Any, evaluator: Evaluator, variables: PyTree, source: Source) -> float:
    """Mean NME (fraction, no flip-test) on the validation split."""
    split = config.dataset.val_split
    res = evaluate_splits(
        evaluator(variables),
        {split: eval_batches_fn(config, source)},
        config.dataset.name,
        config.eval.normalizer,
    )
    return float(res[split]["no_flip"]["nme"])


def evaluate(
    config: Any,
    workdir: str,
    kind: str,
    model: Any,
    variables: PyTree,
    sources: Mapping[str, Source],
    label: str,
) -> dict:
    """Scores every test split in `sources` (all but 'train', or `eval.splits`); writes
    <workdir>/eval/metrics.json and plots on host 0, prints the table; returns the results."""
    splits = tuple(config.eval.splits) or tuple(k for k in sources if k != "train")
    num_landmarks = int(np.asarray(next(iter(sources.values()))[0]["landmarks"]).shape[0])
    flip_perm = geometry.flip_permutation(num_landmarks) if config.eval.flip_test else None
    predict = Evaluator(kind, model, flip_perm)(variables)
    out_dir = os.path.join(workdir, "eval") if jax.process_index() == 0 else None
    results = evaluate_splits(
        predict,
        {s: eval_batches_fn(config, sources[s]) for s in splits},
        config.dataset.name,
        config.eval.normalizer,
        out_dir=out_dir,
        model_name=label,
    )
    if jax.process_index() == 0:
        print(format_table({label: results}), flush=True)
    return results
