"""Writes a tiny fake 300W download in the real format (tests, timing).

The tree has the six folders with .jpg/.png images beside 1-based .pts files, a file
name with a space (as ibug's 'image_092 _01.jpg') and one image large enough that its
crop is downscaled to 512 px. `archive` packs the same tree the ways users get it.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
import tempfile
import zipfile

import numpy as np

from fan_jax_datasets import common
from fan_jax_datasets.the300w import the300w_dataset_builder as the300w


@dataclasses.dataclass
class FixtureFace:
    subset: str
    file_name: str  # 'ibug/image_092 _01.jpg'
    landmarks: np.ndarray  # [68, 2] 0-based, exactly what the .pts holds minus 1


@dataclasses.dataclass
class Fixture:
    manual_dir: str
    faces: dict[str, list[FixtureFace]]  # subset -> faces
    images: dict[str, np.ndarray]  # file_name -> RGB as decoded from the written file

    def split(self, name: str) -> list[FixtureFace]:
        return [f for s in the300w.SPLITS[name] for f in self.faces[s]]


# subset -> [(file name, width, height, face box x0, y0, x1, y1)]
_LAYOUT = {
    "afw": [
        ("134212_1.jpg", 360, 300, (60, 30, 300, 270)),  # crop 528 px -> downscaled to 512
        ("1051618982_1.jpg", 120, 100, (30, 20, 90, 85)),
    ],
    "helen_trainset": [
        ("100032540_1.jpg", 140, 120, (40, 25, 100, 95)),
        ("10405146_1.jpg", 100, 130, (-8, 30, 50, 100)),
    ],  # points left of x=0
    "helen_testset": [("2968560214_1.jpg", 128, 128, (30, 30, 100, 100))],
    "lfpw_trainset": [
        ("image_0001.png", 110, 90, (25, 15, 85, 80)),
        ("image_0002.png", 96, 96, (20, 20, 76, 80)),
    ],
    "lfpw_testset": [("image_0001.png", 90, 120, (15, 30, 75, 100))],
    "ibug": [
        ("image_003_1.jpg", 150, 100, (50, 15, 110, 90)),
        ("image_092 _01.jpg", 100, 100, (20, 20, 80, 85)),
    ],
}


def _generated_layout(faces_per_subset: int, size: int):
    layout = {}
    for subset in the300w.SUBSETS:
        ext = ".png" if subset.startswith("lfpw") else ".jpg"
        side = int(size * 0.55)
        off = (size - side) // 2
        layout[subset] = [
            (f"image_{i:04d}{ext}", size, size, (off, off, off + side, off + side))
            for i in range(faces_per_subset)
        ]
    return layout


def write_tree(
    root: str, faces_per_subset: int | None = None, size: int = 160, seed: int = 0
) -> Fixture:
    """Writes the six folders under root. faces_per_subset=None: the small fixed layout;
    an int: that many `size` x `size` images per folder (for timing builds)."""
    rng = np.random.default_rng(seed)
    layout = _LAYOUT if faces_per_subset is None else _generated_layout(faces_per_subset, size)
    faces: dict[str, list[FixtureFace]] = {}
    images: dict[str, np.ndarray] = {}
    for subset, entries in layout.items():
        folder = "/".join(the300w.SUBSETS[subset])
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        faces[subset] = []
        for name, w, h, box in entries:
            file_name = f"{folder}/{name}"
            stem, ext = os.path.splitext(name)
            data = common.encode_file(common.fixture_image(w, h, seed=len(images)), ext)
            with open(os.path.join(root, folder, name), "wb") as f:
                f.write(data)
            images[file_name] = common.decode_image(data, file_name)
            one_based = common.fixture_landmarks(rng, the300w.NUM_LANDMARKS, box) + 1.0
            text = [f"{x:.3f} {y:.3f}" for x, y in one_based]
            with open(os.path.join(root, folder, stem + ".pts"), "w") as f:
                f.write("version: 1\nn_points:  68\n{\n" + "\n".join(text) + "\n}\n")
            written = np.array([[float(v) for v in t.split()] for t in text], np.float64)
            faces[subset].append(FixtureFace(subset, file_name, (written - 1.0).astype(np.float32)))
    return Fixture(manual_dir=root, faces=faces, images=images)


def pack(tree_root: str, out_dir: str, archive: str) -> None:
    """archive: 'per_set_zip' (afw.zip, helen.zip, lfpw.zip, ibug.zip, as ibug serves
    them), '300w.zip' or '300w.tar.gz' (the whole tree under a 300W/ folder)."""
    os.makedirs(out_dir, exist_ok=True)
    files = []
    for dirpath, _, names in os.walk(tree_root):
        for n in names:
            full = os.path.join(dirpath, n)
            files.append((full, os.path.relpath(full, tree_root).replace(os.sep, "/")))
    if archive == "per_set_zip":
        for top in ("afw", "helen", "lfpw", "ibug"):
            with zipfile.ZipFile(os.path.join(out_dir, f"{top}.zip"), "w") as z:
                for full, rel in files:
                    if rel.startswith(top + "/"):
                        z.write(full, rel)
    elif archive == "300w.zip":
        with zipfile.ZipFile(os.path.join(out_dir, "300w.zip"), "w") as z:
            for full, rel in files:
                z.write(full, "300W/" + rel)
    elif archive == "300w.tar.gz":
        with tarfile.open(os.path.join(out_dir, "300w.tar.gz"), "w:gz") as t:
            for full, rel in files:
                t.add(full, "300W/" + rel)
    else:
        raise ValueError(f"unknown archive kind {archive!r}")


def write_fixture(
    manual_dir: str,
    archive: str | None = None,
    faces_per_subset: int | None = None,
    size: int = 160,
    seed: int = 0,
) -> Fixture:
    """A fake 300W download in manual_dir: the folder tree, or archives (see `pack`)."""
    if archive is None:
        return write_tree(manual_dir, faces_per_subset, size, seed)
    with tempfile.TemporaryDirectory() as tree:
        fixture = write_tree(tree, faces_per_subset, size, seed)
        pack(tree, manual_dir, archive)
    fixture.manual_dir = manual_dir
    return fixture
