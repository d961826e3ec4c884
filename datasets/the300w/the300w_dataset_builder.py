"""300W: 68 landmarks, train 3148 / common 554 / challenging 135 / full 689 faces."""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections import defaultdict
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

try:
    from fan_jax_datasets import common
except ImportError:  # `tfds build datasets/the300w` from a checkout that is not pip-installed
    import common  # type: ignore[no-redef]

NUM_LANDMARKS = 68
# Subset name -> folder path components, as in ibug's downloads.
SUBSETS = {
    "afw": ("afw",),
    "helen_trainset": ("helen", "trainset"),
    "helen_testset": ("helen", "testset"),
    "lfpw_trainset": ("lfpw", "trainset"),
    "lfpw_testset": ("lfpw", "testset"),
    "ibug": ("ibug",),
}
SPLITS = {
    "train": ("afw", "helen_trainset", "lfpw_trainset"),
    "common": ("helen_testset", "lfpw_testset"),
    "challenging": ("ibug",),
    "full": ("helen_testset", "lfpw_testset", "ibug"),
}
OFFICIAL_COUNTS = {"train": 3148, "common": 554, "challenging": 135, "full": 689}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Archives scanned for the tree. Only these names: the default manual_dir is shared by
# all datasets, and listing an unrelated .tar.gz (WFLW's) would decompress all of it.
ARCHIVE_PREFIXES = ("afw", "helen", "lfpw", "ibug", "300w")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
300W cannot be downloaded automatically. From https://ibug.doc.ic.ac.uk/resources/300-W/
(the annotated AFW, HELEN, LFPW and IBUG sets, via "facial point annotations") get the
images with their 68-point .pts files and place them in the manual_dir
(default <data_dir>/downloads/manual/) as these folders:

  afw/              (337 images + .pts)
  helen/trainset/   (2000)
  helen/testset/    (330)
  lfpw/trainset/    (811)
  lfpw/testset/     (224)
  ibug/             (135)

The folders may sit under one parent folder (e.g. 300W/afw/...). Instead of folders,
the downloaded archives also work as they are: afw.zip, helen.zip, lfpw.zip, ibug.zip,
or one 300w*.zip / 300w*.tar / 300w*.tar.gz / 300w*.tgz holding the whole tree."""


@dataclasses.dataclass(frozen=True)
class Face:
    subset: str
    file_name: str  # e.g. 'helen/trainset/100032540_1.jpg'
    source: common.FileSource
    image_member: str  # name inside `source`
    landmarks: np.ndarray  # [68, 2] float32, 0-based


def parse_pts(text: str, name: str, expected: int = NUM_LANDMARKS) -> np.ndarray:
    """Parses a 300W .pts file; returns [n, 2] float32 in 0-based pixel coordinates.

    .pts coordinates are 1-based (the 300W convention, from MATLAB): 1 is subtracted.
    Raises DatasetFormatError naming the file (and line) on bad input, including a point
    count other than `expected`.
    """
    lines = text.splitlines()
    n_points = None
    start = end = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.lower().startswith("n_points"):
            try:
                n_points = int(stripped.split(":", 1)[1])
            except (IndexError, ValueError) as e:
                raise common.DatasetFormatError(
                    f"{name}:{i + 1}: bad n_points line {line!r}."
                ) from e
        elif stripped == "{" and start is None:
            start = i + 1
        elif stripped == "}" and start is not None:
            end = i
            break
    if start is None or end is None:
        raise common.DatasetFormatError(f"{name}: not a .pts file (no '{{' ... '}}' block).")
    points = []
    for i in range(start, end):
        fields = lines[i].split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError(f"{len(fields)} fields")
            points.append((float(fields[0]), float(fields[1])))
        except ValueError as e:
            raise common.DatasetFormatError(
                f"{name}:{i + 1}: expected 'x y', got {lines[i]!r} ({e})."
            ) from e
    if n_points is not None and n_points != len(points):
        raise common.DatasetFormatError(
            f"{name}: header says n_points {n_points} but the file has {len(points)} points."
        )
    if len(points) != expected:
        raise common.DatasetFormatError(
            f"{name}: {len(points)} points, expected {expected} (300W 68-point markup)."
        )
    pts = np.asarray(points, np.float64) - 1.0
    if not np.all(np.isfinite(pts)):
        raise common.DatasetFormatError(f"{name}: non-finite coordinate.")
    return pts.astype(np.float32)


def classify(name: str) -> tuple[str, str] | None:
    """'300W/helen/trainset/x.pts' -> ('helen_trainset', 'helen/trainset/x.pts')."""
    parts = name.split("/")
    lower = [p.lower() for p in parts]
    for i in range(len(parts)):
        for subset, comps in SUBSETS.items():
            if tuple(lower[i : i + len(comps)]) == comps and len(parts) > i + len(comps):
                return subset, "/".join(parts[i:])
    return None


class Builder(common.LandmarkBuilder):
    """300W (AFW, HELEN, LFPW, IBUG with the 68-point markup) stored as face crops.

    Why crops: one square crop per face (side 2.3 x the box, enough for the +-30 deg /
    0.75-1.25 scale / box x1.25 augmentation; at most 512 px, JPEG) instead of the full
    photo keeps decode cost per training example and disk use low.

    300W ships no boxes: the box is the landmark box (floor(min), ceil(max)), as in the
    toolkits. .pts coordinates are 1-based; they are converted to 0-based by subtracting
    1 ('landmarks' and 'original_landmarks' are 0-based). Landmarks outside the image
    are kept (the crop is zero padded there).

    NME is evaluated in the original image frame: 'to_original' maps stored-crop
    coordinates back, and 'original_landmarks' are the annotations (0-based).

    Input: the six folders (extracted, anywhere under manual_dir) or the archives named
    in MANUAL_DOWNLOAD_INSTRUCTIONS, read in place; folders win over archives for a file
    found in both. Images without a .pts are ignored.
    Bad input fails the build naming the file: a .pts with a wrong point count or a bad
    line, a .pts without its image, an image that cannot be decoded. Nothing is skipped,
    so split sizes stay the published ones.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Face crops with margin, to_original affine, subset names."
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "300W, 68 landmarks (AFW, HELEN, LFPW, IBUG). One example per face: a square "
                "crop with margin and the affine back to the original image."
            ),
            features=common.base_features(NUM_LANDMARKS, subset=tfds.features.Text()),
            homepage="https://ibug.doc.ic.ac.uk/resources/300-W/",
            citation=(
                "@inproceedings{sagonas2013300, title={300 Faces in-the-Wild Challenge: The first "
                "facial landmark localization Challenge}, author={Sagonas, Christos and "
                "Tzimiropoulos, Georgios and Zafeiriou, Stefanos and Pantic, Maja}, "
                "booktitle={ICCV Workshops}, year={2013}}"
            ),
        )

    def _split_generators(self, dl_manager):
        manual = common.manual_dir(dl_manager, "the300w", MANUAL_DOWNLOAD_INSTRUCTIONS)
        faces = _collect_faces(manual)
        return {
            split: self._generate_examples(split, [f for s in subsets for f in faces[s]])
            for split, subsets in SPLITS.items()
        }

    def _generate_examples(self, split: str, faces: list[Face]):
        by_source: dict[int, list[Face]] = defaultdict(list)
        for face in faces:
            by_source[id(face.source)].append(face)
        summary = common.BuildSummary("the300w", split)
        for group in by_source.values():
            source = group[0].source
            by_member = {f.image_member: f for f in group}
            for member, data in source.read_many(by_member):
                face = by_member[member]
                image = common.decode_image(data, source.describe(member))
                summary.images += 1
                summary.examples += 1
                yield (
                    face.file_name,
                    common.make_example(
                        image,
                        face.landmarks,
                        common.landmark_box(face.landmarks),
                        face.file_name,
                        subset=face.subset,
                    ),
                )
        common.report(summary, OFFICIAL_COUNTS.get(split))


def _open_sources(manual: str) -> list[common.FileSource]:
    sources: list[common.FileSource] = [common.DirSource(manual)]
    candidates = []
    for d in [manual, *sorted(e.path for e in os.scandir(manual) if e.is_dir())]:
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            low = e.name.lower()
            if (
                e.is_file()
                and low.startswith(ARCHIVE_PREFIXES)
                and low.endswith(common.ARCHIVE_SUFFIXES)
            ):
                candidates.append(e.path)
    sources += [common.open_archive(p) for p in candidates]
    return sources


def _collect_faces(manual: str) -> dict[str, list[Face]]:
    """All .pts + image pairs per subset, validated before anything is written."""
    pts_files: dict[str, tuple[str, common.FileSource, str]] = {}  # rel -> (subset, source, member)
    images: dict[
        str, tuple[common.FileSource, str]
    ] = {}  # rel without extension -> (source, member)
    for source in _open_sources(manual):
        for member in source.names():
            found = classify(member)
            if found is None:
                continue
            subset, rel = found
            stem, ext = posixpath.splitext(rel)
            ext = ext.lower()
            if ext == ".pts":
                pts_files.setdefault(rel, (subset, source, member))
            elif ext in IMAGE_EXTENSIONS:
                images.setdefault(stem, (source, member))

    present = {subset for subset, _, _ in pts_files.values()}
    absent = [
        f"{'/'.join(c)}/ (no .pts files found)" for s, c in SUBSETS.items() if s not in present
    ]
    if absent:
        raise common.missing_files("the300w", manual, MANUAL_DOWNLOAD_INSTRUCTIONS, absent)
    no_image = [
        f"{posixpath.splitext(rel)[0]}.jpg or .png (the image of {src.describe(member)})"
        for rel, (_, src, member) in sorted(pts_files.items())
        if posixpath.splitext(rel)[0] not in images
    ]
    if no_image:
        raise common.missing_files("the300w", manual, MANUAL_DOWNLOAD_INSTRUCTIONS, no_image)

    by_source: dict[int, list[str]] = defaultdict(list)
    for rel, (_, src, _) in pts_files.items():
        by_source[id(src)].append(rel)
    faces: dict[str, list[Face]] = {s: [] for s in SUBSETS}
    for rels in by_source.values():
        src = pts_files[rels[0]][1]
        member_to_rel = {pts_files[r][2]: r for r in rels}
        for member, data in src.read_many(member_to_rel):
            rel = member_to_rel[member]
            subset = pts_files[rel][0]
            landmarks = parse_pts(data.decode("utf-8", errors="replace"), src.describe(member))
            img_src, img_member = images[posixpath.splitext(rel)[0]]
            file_name = classify(img_member)[1]
            faces[subset].append(Face(subset, file_name, img_src, img_member, landmarks))
    for subset in faces:
        faces[subset].sort(key=lambda f: f.file_name)
    return faces
