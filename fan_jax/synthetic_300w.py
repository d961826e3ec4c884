"""Synthetic faces (`fan_jax.synthetic`) written as a 300W release tree: afw, helen, lfpw
train/test and ibug folders of images with 1-based `.pts` files, which the real 300W TFDS
builder reads like the download.

    python -m fan_jax.synthetic_300w --out /tmp/synth300w --num_train 600 --num_test 150
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np

from fan_jax.synthetic import SUBSETS, image_rng, render_face, write_preview

# The real release's test counts (common = helen + lfpw test, challenging = ibug).
_REAL_COMMON, _REAL_CHALLENGING = 554, 135


def format_pts(landmarks: np.ndarray) -> str:
    """300W .pts text for 0-based landmarks (written 1-based, the 300W convention)."""
    lm = np.asarray(landmarks, np.float64) + 1.0
    rows = "\n".join(f"{x:.6f} {y:.6f}" for x, y in lm)
    return f"version: 1\nn_points:  {len(lm)}\n{{\n{rows}\n}}\n"


def read_pts(path: str) -> np.ndarray:
    """Landmarks of a .pts file, as written (1-based), float64 [N, 2]."""
    with open(path) as fh:
        lines = [ln.strip() for ln in fh if ln.strip()]
    n = int(lines[1].split(":")[1])
    start = lines.index("{") + 1
    pts = np.array([[float(v) for v in ln.split()] for ln in lines[start : start + n]])
    if pts.shape != (n, 2) or lines[start + n] != "}":
        raise ValueError(f"malformed pts file {path}")
    return pts


def subset_counts(num_train: int, num_test: int) -> dict[str, int]:
    """Images per 300W folder: num_train over afw/helen/lfpw train in the real proportions;
    num_test over common (helen, lfpw test) and challenging (ibug) as 554:135, at least one ibug."""

    def split(total, names_shares):
        shares = np.array([s for _, s in names_shares], np.float64)
        raw = total * shares / shares.sum()
        n = np.floor(raw).astype(int)
        for i in np.argsort(-(raw - n))[: total - n.sum()]:
            n[i] += 1
        return {name: int(k) for (name, _), k in zip(names_shares, n)}

    n_ibug = int(round(num_test * _REAL_CHALLENGING / (_REAL_COMMON + _REAL_CHALLENGING)))
    if num_test >= 2:
        n_ibug = min(max(n_ibug, 1), num_test - 1)
    counts = {}
    counts.update(split(num_train, [(s[0], s[2]) for s in SUBSETS if s[1] == "train"]))
    counts.update(split(num_test - n_ibug, [(s[0], s[2]) for s in SUBSETS if s[1] == "common"]))
    counts["ibug"] = n_ibug
    return counts


def _file_name(folder: str, index: int, ext: str, spaced: bool) -> str:
    if folder == "afw":
        stem = f"{1000000 + 7919 * index}_1"
    elif folder.startswith("helen"):  # distinct train / test names, as in the real release
        stem = f"{(100000000 if folder.endswith('trainset') else 300000000) + 104729 * index}_1"
    elif folder.startswith("lfpw"):
        stem = f"image_{index + 1:04d}"
    else:
        stem = f"image_{index + 1:03d}_1"
    if spaced:  # like ibug's real 'image_092 _01.jpg'
        stem = f"image_{index + 1:03d} _01"
    return stem + ext


def tree_file_names(counts: dict[str, int]) -> dict[str, list[str]]:
    """File names per folder. One name has a space (in ibug, or the first non-empty folder)."""
    order = ["ibug"] + [sub[0] for sub in SUBSETS if sub[0] != "ibug"]
    spaced_folder = next((name for name in order if counts.get(name, 0) > 0), None)
    names = {}
    for folder, _, _, ext, _ in SUBSETS:
        n = counts.get(folder, 0)
        names[folder] = [
            _file_name(folder, i, ext, folder == spaced_folder and i == min(1, n - 1))
            for i in range(n)
        ]
    return names


def _image_shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    if rng.random() < 0.7:
        return size, size
    return size, int(round(size * rng.uniform(0.8, 1.25)))  # some landscape / portrait images


_SUBSET_BY_FOLDER = {s[0]: s for s in SUBSETS}


def _tree_image(seed: int, folder: str, index: int, size: int):
    _, split, _, _, code = _SUBSET_BY_FOLDER[folder]
    rng = image_rng(seed, index, code)
    shape = _image_shape(rng, size)
    img, lm = render_face(rng, shape, split == "challenging")
    return img, lm, rng


def render_tree_image(
    seed: int, folder: str, index: int, size: int = 320
) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of a 300W folder (e.g. 'helen/trainset') exactly as write_300w_tree draws it."""
    img, lm, _ = _tree_image(seed, folder, index, size)
    return img, lm


def _write_one(task) -> str:
    out_dir, folder, name, seed, index, size = task
    img, lm, rng = _tree_image(seed, folder, index, size)
    path = os.path.join(out_dir, folder, name)
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if name.endswith(".png"):
        ok = cv2.imwrite(path, bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        ok = cv2.imwrite(path, bgr, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))])
    if not ok:
        raise OSError(f"could not write {path}")
    with open(os.path.splitext(path)[0] + ".pts", "w") as fh:
        fh.write(format_pts(lm))
    return path


def _init_worker():
    cv2.setNumThreads(1)


def write_300w_tree(
    out_dir: str,
    num_train: int,
    num_test: int,
    seed: int = 0,
    size: int = 320,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, int]:
    """Writes a synthetic 300W tree (afw, helen, lfpw train/test, ibug) and returns image counts.

    Counts are per folder plus 'train', 'common', 'challenging', 'full' and 'total'. The ibug
    folder gets the challenging faces and one file name with a space, as in the real release.
    """
    counts = subset_counts(num_train, num_test)
    names = tree_file_names(counts)
    tasks = []
    for folder, _, _, _, _ in SUBSETS:
        d = os.path.join(out_dir, folder)
        os.makedirs(d, exist_ok=True)
        old = [n for n in os.listdir(d) if n.endswith((".pts", ".jpg", ".png"))]
        if old and not overwrite:
            raise FileExistsError(
                f"{d} already holds 300W files; pass overwrite=True to replace them"
            )
        for n in old:
            os.remove(os.path.join(d, n))
        tasks += [
            (out_dir, folder, name, int(seed), i, int(size)) for i, name in enumerate(names[folder])
        ]
    if workers > 1:
        # spawn, not fork: the caller may hold JAX / TF threads that a fork would copy mid-flight.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as ex:
            list(ex.map(_write_one, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers)))))
    else:
        for t in tasks:
            _write_one(t)
    out = dict(counts)
    out["train"] = sum(counts[s[0]] for s in SUBSETS if s[1] == "train")
    out["common"] = sum(counts[s[0]] for s in SUBSETS if s[1] == "common")
    out["challenging"] = counts["ibug"]
    out["full"] = out["common"] + out["challenging"]
    out["total"] = out["train"] + out["full"]
    with open(os.path.join(out_dir, "synthetic_300w.json"), "w") as fh:
        json.dump(
            {"generator": "fan_jax.synthetic", "seed": int(seed), "size": int(size), "counts": out},
            fh,
            indent=1,
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, int]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="root of the 300W tree to write")
    ap.add_argument("--num_train", type=int, required=True)
    ap.add_argument(
        "--num_test", type=int, required=True, help="common + challenging (ibug) images"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=320, help="image height in pixels")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--preview", default="", help="also write a landmark preview grid here")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    counts = write_300w_tree(
        args.out, args.num_train, args.num_test, args.seed, args.size, args.workers, args.overwrite
    )
    dt = time.perf_counter() - t0
    for k, v in counts.items():
        print(f"{k:>16}: {v}")
    print(
        f"wrote {counts['total']} images to {args.out} in {dt:.1f} s "
        f"({counts['total'] / max(dt, 1e-9):.1f} images/s, {args.workers} worker(s))"
    )
    if args.preview:
        write_preview(args.preview, seed=args.seed, size=args.size)
        print(f"preview: {args.preview}")
    return counts


if __name__ == "__main__":
    main()
