"""WFLW: 98 landmarks, 7500 train / 2500 test faces (Wu et al., CVPR 2018)."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

try:
    from fan_jax_datasets import common
except ImportError:  # `tfds build datasets/wflw` from a checkout that is not pip-installed
    import common  # type: ignore[no-redef]

NUM_LANDMARKS = 98
ATTRIBUTES = ("pose", "expression", "illumination", "make_up", "occlusion", "blur")
# Split name of each attribute's test subset (the WFLW list files use these words).
SUBSET_SPLITS = (
    "test_largepose",
    "test_expression",
    "test_illumination",
    "test_makeup",
    "test_occlusion",
    "test_blur",
)
NUM_FIELDS = 2 * NUM_LANDMARKS + 4 + len(ATTRIBUTES) + 1  # 207

IMAGES_ARCHIVE = "WFLW_images.tar.gz"
ANNOTATIONS_ARCHIVE = "WFLW_annotations.tar.gz"
IMAGES_DIR = "WFLW_images"
ANNOTATIONS_DIR = "WFLW_annotations"
LIST_FILES = {
    "train": "list_98pt_rect_attr_train_test/list_98pt_rect_attr_train.txt",
    "test": "list_98pt_rect_attr_train_test/list_98pt_rect_attr_test.txt",
}
OFFICIAL_COUNTS = {
    "train": 7500,
    "test": 2500,
    "test_largepose": 326,
    "test_expression": 314,
    "test_illumination": 698,
    "test_makeup": 206,
    "test_occlusion": 736,
    "test_blur": 773,
}

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
WFLW cannot be downloaded automatically. From https://wywu.github.io/projects/LAB/WFLW.html
download the two files below and put them, unextracted, in the manual_dir
(default <data_dir>/downloads/manual/):

  {IMAGES_ARCHIVE}       (images, WFLW_images/<event>/<name>.jpg)
  {ANNOTATIONS_ARCHIVE}  (WFLW_annotations/list_98pt_rect_attr_train_test/*.txt)

Already-extracted folders {IMAGES_DIR}/ and {ANNOTATIONS_DIR}/ in the manual_dir work too
(they are used instead of the archives when present)."""


@dataclasses.dataclass(frozen=True)
class Face:
    key: str
    image_path: str  # relative to WFLW_images
    landmarks: np.ndarray  # [98, 2] float32
    box: np.ndarray  # [4] x_min, y_min, x_max, y_max
    attributes: np.ndarray  # [6] bool


def parse_line(line: str, file_name: str, line_number: int) -> Face:
    """One annotation line -> Face; DatasetFormatError names file:line on bad input."""
    fields = line.split()
    where = f"{file_name}:{line_number}"
    if len(fields) != NUM_FIELDS:
        raise common.DatasetFormatError(
            f"{where}: expected {NUM_FIELDS} space-separated fields (196 coordinates, 4 box "
            f"values, 6 attribute flags, image path), got {len(fields)}."
        )
    try:
        numbers = np.array([float(v) for v in fields[: 2 * NUM_LANDMARKS + 4]], np.float64)
        flags = [int(v) for v in fields[2 * NUM_LANDMARKS + 4 : -1]]
    except ValueError as e:
        raise common.DatasetFormatError(f"{where}: non-numeric value ({e}).") from e
    if not np.all(np.isfinite(numbers)):
        raise common.DatasetFormatError(f"{where}: non-finite coordinate.")
    if any(f not in (0, 1) for f in flags):
        raise common.DatasetFormatError(f"{where}: attribute flags must be 0 or 1, got {flags}.")
    return Face(
        key=f"{os.path.basename(file_name)}:{line_number}",
        image_path=fields[-1],
        landmarks=numbers[: 2 * NUM_LANDMARKS].reshape(NUM_LANDMARKS, 2).astype(np.float32),
        box=numbers[2 * NUM_LANDMARKS :],
        attributes=np.array(flags, bool),
    )


def parse_list(text: str, file_name: str) -> list[Face]:
    return [
        parse_line(line, file_name, i)
        for i, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


class Builder(common.LandmarkBuilder):
    """WFLW faces stored as crops with margin, 98 landmarks and 6 attribute flags.

    Why crops: WFLW images are up to ~6000 px and often hold many faces. Storing one
    square crop per face (side 2.3 x the box, enough for the +-30 deg / 0.75-1.25 scale /
    box x1.25 augmentation; at most 512 px, JPEG) makes an epoch decode a few hundred KB
    per face instead of a multi-MB photo, and keeps the dataset on disk small.

    The WFLW box (x_min, y_min, x_max, y_max) centres the crop. WFLW coordinates are used
    as given (0-based pixel positions, as all WFLW toolkits read them). Landmarks outside
    the image are kept; the crop is zero padded there.

    NME is evaluated in the original image frame: 'to_original' maps stored-crop
    coordinates back, and 'original_landmarks' are the untouched annotations.

    Test subsets (test_largepose, ...) are the test lines whose attribute flag is set.

    Bad input fails the build naming the file: a malformed list line (file:line), a
    missing image, an image that cannot be decoded. Nothing is skipped, so split sizes
    stay those of the paper and NME figures stay comparable.

    Both archives are read in place; nothing is extracted to disk.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Face crops with margin, to_original affine, attributes."
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "WFLW (Wider Facial Landmarks in-the-Wild), 98 landmarks. One example per "
                "face: a square crop with margin and the affine back to the original image."
            ),
            features=common.base_features(
                NUM_LANDMARKS,
                attributes=tfds.features.Tensor(shape=(len(ATTRIBUTES),), dtype=np.bool_),
            ),
            homepage="https://wywu.github.io/projects/LAB/WFLW.html",
            citation=(
                "@inproceedings{wayne2018lab, title={Look at Boundary: A Boundary-Aware Face "
                "Alignment Algorithm}, author={Wu, Wayne and Qian, Chen and Yang, Shuo and Wang, "
                "Quan and Cai, Yici and Zhou, Qiang}, booktitle={CVPR}, year={2018}}"
            ),
        )

    def _split_generators(self, dl_manager):
        manual = common.manual_dir(dl_manager, "wflw", MANUAL_DOWNLOAD_INSTRUCTIONS)
        faces = _read_annotations(manual)
        images = _open_images(manual)
        needed = sorted({f.image_path for split in faces.values() for f in split})
        missing = [images.describe(p) for p in needed if not images.exists(p)]
        if missing:
            raise common.missing_files(
                "wflw",
                manual,
                MANUAL_DOWNLOAD_INSTRUCTIONS,
                [f"image {m} (listed in the annotations)" for m in missing],
            )
        test = faces["test"]
        splits = {"train": faces["train"], "test": test}
        for i, name in enumerate(SUBSET_SPLITS):
            splits[name] = [f for f in test if f.attributes[i]]
        return {name: self._generate_examples(images, name, fs) for name, fs in splits.items()}

    def _generate_examples(self, images: common.FileSource, split: str, faces: list[Face]):
        by_image = defaultdict(list)
        for face in faces:
            by_image[face.image_path].append(face)
        summary = common.BuildSummary("wflw", split)
        for path, data in images.read_many(by_image):
            image = common.decode_image(data, images.describe(path))
            summary.images += 1
            for face in by_image[path]:
                summary.examples += 1
                yield (
                    face.key,
                    common.make_example(
                        image, face.landmarks, face.box, path, attributes=face.attributes
                    ),
                )
        common.report(summary, OFFICIAL_COUNTS.get(split))


def _read_annotations(manual: str) -> dict[str, list[Face]]:
    folder = common.find_file(manual, ANNOTATIONS_DIR)
    archive = common.find_file(manual, ANNOTATIONS_ARCHIVE)
    if folder and os.path.isdir(folder):
        source: common.FileSource = common.DirSource(folder)
    elif archive:
        source = common.open_archive(archive, strip_prefix=ANNOTATIONS_DIR)
    else:
        raise common.missing_files(
            "wflw",
            manual,
            MANUAL_DOWNLOAD_INSTRUCTIONS,
            [f"{ANNOTATIONS_ARCHIVE} (or {ANNOTATIONS_DIR}/)"],
        )
    try:
        missing = [f"{source.describe(p)}" for p in LIST_FILES.values() if not source.exists(p)]
        if missing:
            raise common.missing_files("wflw", manual, MANUAL_DOWNLOAD_INSTRUCTIONS, missing)
        out = {}
        for split, rel in LIST_FILES.items():
            text = source.read(rel).decode("utf-8")
            out[split] = parse_list(text, source.describe(rel))
        return out
    finally:
        source.close()


def _open_images(manual: str) -> common.FileSource:
    folder = common.find_file(manual, IMAGES_DIR)
    if folder and os.path.isdir(folder):
        return common.DirSource(folder)
    archive = common.find_file(manual, IMAGES_ARCHIVE)
    if archive:
        return common.open_archive(archive, strip_prefix=IMAGES_DIR)
    raise common.missing_files(
        "wflw", manual, MANUAL_DOWNLOAD_INSTRUCTIONS, [f"{IMAGES_ARCHIVE} (or {IMAGES_DIR}/)"]
    )
