"""Writes tiny fake COFW_{train,test}_color.mat files in MATLAB's v7.3 layout.

What MATLAB writes and the builder must read: an HDF5 file behind a 512-byte text
userblock; each variable a dataset carrying a 'MATLAB_class' attribute; arrays stored
transposed (column-major MATLAB N x 87 -> HDF5 87 x N, an H x W x 3 image -> 3 x W x H);
a cell array as a dataset of object references to datasets in the '#refs#' group.
"""

from __future__ import annotations

import dataclasses
import os
import string

import h5py
import numpy as np

from fan_jax_datasets import common
from fan_jax_datasets.cofw import cofw_dataset_builder as cofw

_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."


@dataclasses.dataclass
class FixtureFace:
    image: np.ndarray  # as stored: [H, W, 3] or [H, W] (greyscale)
    landmarks: np.ndarray  # [29, 2] 0-based
    occluded: np.ndarray  # [29] bool
    box: np.ndarray  # x0, y0, x1, y1 0-based


@dataclasses.dataclass
class Fixture:
    manual_dir: str
    faces: dict[str, list[FixtureFace]]

    def split(self, name: str) -> list[FixtureFace]:
        return self.faces[name]


# split -> [(width, height, greyscale, box x, y, w, h 1-based)]
_LAYOUT = {
    "train": [
        (120, 100, False, (31, 21, 50, 55)),
        (100, 110, True, (21, 31, 55, 50)),  # greyscale, as some COFW images are
        (140, 90, False, (-4, 11, 60, 62)),
    ],  # box (and points) past the left edge
    "test": [(96, 96, False, (25, 25, 45, 48)), (110, 130, True, (30, 40, 50, 60))],
}


def _ref_name(k: int) -> str:
    # MATLAB names '#refs#' members a, b, ..., z, ba, bb, ...
    letters = string.ascii_lowercase
    name = letters[k % 26]
    k //= 26
    while k:
        name = letters[k % 26] + name
        k //= 26
    return name


def _set_class(ds, matlab_class: str) -> None:
    ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)


def write_mat(
    path: str,
    images_var: str,
    phis_var: str,
    boxes_var: str,
    images: list[np.ndarray],
    phis: np.ndarray,
    boxes: np.ndarray,
) -> None:
    """Writes one v7.3 .mat: images as a cell array, phis N x 87, boxes N x 4 (doubles)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs_group = f.create_group("#refs#")
        refs = []
        for k, image in enumerate(images):
            ds = refs_group.create_dataset(_ref_name(k), data=np.ascontiguousarray(image.T))
            _set_class(ds, "uint8")
            refs.append(ds.ref)
        cell = f.create_dataset(
            images_var, data=np.array(refs, dtype=h5py.ref_dtype).reshape(1, -1)
        )
        _set_class(cell, "cell")
        _set_class(f.create_dataset(phis_var, data=np.ascontiguousarray(phis.T)), "double")
        _set_class(f.create_dataset(boxes_var, data=np.ascontiguousarray(boxes.T)), "double")
    with open(path, "r+b") as fh:
        fh.write(_HEADER.ljust(116) + bytes(8) + b"\x00\x02" + b"IM")


def write_fixture(manual_dir: str, seed: int = 0) -> Fixture:
    """Writes COFW_train_color.mat and COFW_test_color.mat into manual_dir."""
    rng = np.random.default_rng(seed)
    os.makedirs(manual_dir, exist_ok=True)
    faces: dict[str, list[FixtureFace]] = {}
    count = 0
    for split, entries in _LAYOUT.items():
        file_name, images_var, phis_var, boxes_var = cofw.FILES[split]
        faces[split] = []
        images, phis, boxes = [], [], []
        for w, h, grey, (bx, by, bw, bh) in entries:
            image = common.fixture_image(w, h, seed=count)
            count += 1
            if grey:
                image = image[..., 1].copy()
            box0 = np.array([bx - 1, by - 1, bx - 1 + bw, by - 1 + bh], np.float64)
            # Quarter-pixel values: exact in float32, so 1-based -> 0-based is checkable exactly.
            lm0 = np.round(common.fixture_landmarks(rng, cofw.NUM_LANDMARKS, box0) * 4) / 4
            occluded = rng.random(cofw.NUM_LANDMARKS) < 0.3
            images.append(image)
            phis.append(np.concatenate([lm0[:, 0] + 1, lm0[:, 1] + 1, occluded.astype(np.float64)]))
            boxes.append([bx, by, bw, bh])
            faces[split].append(FixtureFace(image, lm0.astype(np.float32), occluded, box0))
        write_mat(
            os.path.join(manual_dir, file_name),
            images_var,
            phis_var,
            boxes_var,
            images,
            np.array(phis, np.float64),
            np.array(boxes, np.float64),
        )
    return Fixture(manual_dir=manual_dir, faces=faces)
