"""Writes a tiny fake WFLW download in the real format (tests, timing).

`write_tree` writes WFLW_images/ and WFLW_annotations/ as extracted folders; `pack`
turns such a tree into WFLW_images.tar.gz + WFLW_annotations.tar.gz, which is what
users download. `write_fixture` does both.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
import tempfile

import numpy as np

from fan_jax_datasets import common
from fan_jax_datasets.wflw import wflw_dataset_builder as wflw


@dataclasses.dataclass
class FixtureFace:
    image_path: str
    landmarks: np.ndarray  # [98, 2] float32 as written (0-based)
    box: np.ndarray  # [4]
    attributes: np.ndarray  # [6] bool
    line_number: int


@dataclasses.dataclass
class Fixture:
    manual_dir: str
    faces: dict[str, list[FixtureFace]]  # 'train', 'test'
    images: dict[str, np.ndarray]  # image path -> RGB as decoded from the written file

    def split(self, name: str) -> list[FixtureFace]:
        if name in ("train", "test"):
            return self.faces[name]
        i = wflw.SUBSET_SPLITS.index(name)
        return [f for f in self.faces["test"] if f.attributes[i]]


# (image path, width, height, faces: (box, attribute flags)). One image holds two faces,
# one face sticks out of its image, and every attribute is set on some test face.
_LAYOUT = {
    "train": [
        (
            "0--Parade/0_Parade_marchingband_1_116.jpg",
            160,
            120,
            [((20, 20, 70, 80), (0, 0, 0, 0, 0, 0)), ((90, 30, 140, 90), (1, 0, 0, 0, 0, 1))],
        ),
        (
            "2--Demonstration/2_Demonstration_Protesters_2_12.jpg",
            128,
            128,
            [((-10, 40, 50, 110), (0, 1, 0, 0, 1, 0))],
        ),
        (
            "51--Dresses/51_Dresses_wearingdress_51_377.jpg",
            96,
            140,
            [((20, 30, 76, 100), (0, 0, 0, 0, 0, 0))],
        ),
    ],
    "test": [
        (
            "7--Cheering/7_Cheering_Cheering_7_16.jpg",
            150,
            110,
            [((15, 15, 65, 75), (1, 1, 0, 0, 0, 0)), ((80, 20, 135, 85), (0, 0, 1, 1, 0, 0))],
        ),
        (
            "37--Soccer/37_Soccer_soccer_ball_37_45.jpg",
            120,
            150,
            [((25, 40, 95, 120), (0, 0, 0, 0, 1, 1))],
        ),
        (
            "9--Press_Conference/9_Press_Conference_ISIS_9_71.jpg",
            100,
            100,
            [((20, 20, 80, 85), (0, 0, 0, 0, 0, 0))],
        ),
    ],
}


def write_tree(root: str, seed: int = 0) -> Fixture:
    """Writes root/WFLW_images/... and root/WFLW_annotations/... (extracted layout)."""
    rng = np.random.default_rng(seed)
    faces: dict[str, list[FixtureFace]] = {}
    images: dict[str, np.ndarray] = {}
    for split, entries in _LAYOUT.items():
        lines = []
        faces[split] = []
        for path, w, h, boxes in entries:
            data = common.encode_file(common.fixture_image(w, h, seed=len(images)), ".jpg")
            full = os.path.join(root, wflw.IMAGES_DIR, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(data)
            images[path] = common.decode_image(data, path)
            for box, flags in boxes:
                pts = common.fixture_landmarks(rng, wflw.NUM_LANDMARKS, box)
                text = [f"{v:.6f}" for v in pts.reshape(-1)]
                coords = " ".join(text)
                lines.append(
                    f"{coords} {' '.join(str(int(b)) for b in box)} "
                    f"{' '.join(str(a) for a in flags)} {path}"
                )
                faces[split].append(
                    FixtureFace(
                        image_path=path,
                        landmarks=np.array([float(t) for t in text], np.float32).reshape(-1, 2),
                        box=np.array(box, np.float32),
                        attributes=np.array(flags, bool),
                        line_number=len(lines),
                    )
                )
        list_path = os.path.join(root, wflw.ANNOTATIONS_DIR, wflw.LIST_FILES[split])
        os.makedirs(os.path.dirname(list_path), exist_ok=True)
        with open(list_path, "w") as f:
            f.write("\n".join(lines) + "\n")
    # The real archive also ships per-subset lists (98 points + path); the builder
    # derives subsets from the flags, but write them so the layout is complete.
    sub_dir = os.path.join(root, wflw.ANNOTATIONS_DIR, "list_98pt_test")
    os.makedirs(sub_dir, exist_ok=True)
    for i, name in enumerate(wflw.SUBSET_SPLITS):
        members = [f for f in faces["test"] if f.attributes[i]]
        with open(os.path.join(sub_dir, f"list_98pt_{name}.txt"), "w") as f:
            for face in members:
                f.write(
                    " ".join(f"{v:.6f}" for v in face.landmarks.reshape(-1))
                    + f" {face.image_path}\n"
                )
    return Fixture(manual_dir=root, faces=faces, images=images)


def pack(tree_root: str, out_dir: str) -> None:
    """Tars tree_root/WFLW_images and tree_root/WFLW_annotations into out_dir/*.tar.gz."""
    os.makedirs(out_dir, exist_ok=True)
    for folder, archive in (
        (wflw.IMAGES_DIR, wflw.IMAGES_ARCHIVE),
        (wflw.ANNOTATIONS_DIR, wflw.ANNOTATIONS_ARCHIVE),
    ):
        with tarfile.open(os.path.join(out_dir, archive), "w:gz") as tar:
            tar.add(os.path.join(tree_root, folder), arcname=folder)


def write_fixture(manual_dir: str, extracted: bool = False, seed: int = 0) -> Fixture:
    """A fake WFLW download in manual_dir: the two .tar.gz archives (or the folders)."""
    if extracted:
        return write_tree(manual_dir, seed)
    with tempfile.TemporaryDirectory() as tree:
        fixture = write_tree(tree, seed)
        pack(tree, manual_dir)
    fixture.manual_dir = manual_dir
    return fixture
