"""Code shared by the WFLW, 300W and COFW builders.

Everything a builder stores goes through `make_example`: the face is cut out of the
original image as a square crop with margin (see `crop_with_margin`), re-encoded as
JPEG, and stored with its landmarks in crop coordinates plus the affine `to_original`
that maps crop coordinates back to the original image.

Coordinates follow the project convention: 0-based, pixel (i, j) has its centre at
x=j, y=i; points are (x, y).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import tarfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from fan_jax import geometry
from fan_jax.errors import FanJaxError

# Crop side = CROP_MARGIN * max(box w, h): room for the training augmentation
# (box x1.25, scale down to 0.75, rotation 30 deg) without re-reading the original:
# the rotated training square spans 1.25 / 0.75 * (cos 30 + sin 30) = 2.28 box sides.
CROP_MARGIN = 2.3
# Crops are downscaled (never upscaled) to at most this side. At 512 the box spans
# 512 / 2.3 = 223 px, and a 256x256 training crop (box x1.25, zoom 0.75..1.25) spans
# 223..372 of them: about the input resolution, so little is lost and disk stays small.
MAX_CROP_SIDE = 512
JPEG_QUALITY = 95

# cv2 applies EXIF orientation by default; annotations refer to the stored pixel grid
# (the toolkits read images with PIL, which ignores EXIF), so ignore it.
_IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


class DatasetFilesMissing(FanJaxError, FileNotFoundError):
    """The manual download directory lacks files the builder needs."""


class DatasetFormatError(FanJaxError, ValueError):
    """An annotation or image file does not have the expected format."""


# ----------------------------------------------------------------------------- geometry


# The affine and box helpers are fan_jax.geometry's (one definition for builders and model).
apply_affine = geometry.apply_affine
invert_affine = geometry.invert_affine
landmark_box = geometry.box_from_landmarks


def crop_with_margin(
    image: np.ndarray,
    box: np.ndarray,
    margin: float = CROP_MARGIN,
    max_side: int = MAX_CROP_SIDE,
) -> tuple[np.ndarray, np.ndarray]:
    """Square crop around `box`, zero padded, downscaled so its side is <= max_side.

    The crop is an integer pixel window of side ceil(margin * max(w, h)) whose centre
    is within half a pixel of the box centre, so no resampling happens unless the
    window is larger than `max_side` (then cv2.INTER_AREA, which averages instead of
    aliasing).

    Returns:
        crop: [S, S, C] uint8 with S <= max_side.
        to_original: [2, 3] float64 affine, crop coords -> original image coords.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(1, int(np.ceil(margin * max(x1 - x0, y1 - y0, 1.0) - 1e-6)))
    # The window's pixel centres run left .. left + side - 1.
    left = int(np.round((x0 + x1) / 2 - (side - 1) / 2))
    top = int(np.round((y0 + y1) / 2 - (side - 1) / 2))
    h, w = image.shape[:2]
    window = np.zeros((side, side, *image.shape[2:]), np.uint8)
    sx0, sy0 = max(left, 0), max(top, 0)
    sx1, sy1 = min(left + side, w), min(top + side, h)
    if sx1 > sx0 and sy1 > sy0:
        window[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = image[sy0:sy1, sx0:sx1]
    out = min(side, max_side)
    if out != side:
        window = cv2.resize(window, (out, out), interpolation=cv2.INTER_AREA)
    # Pixel-centre convention: the window's left edge is at x = left - 0.5, so crop pixel
    # k spans [left - 0.5 + k*s, left - 0.5 + (k+1)*s) and its centre is at
    # left + (k + 0.5) * s - 0.5 (= left + k without downscaling).
    s = side / out
    offset = 0.5 * s - 0.5
    to_original = np.array([[s, 0.0, left + offset], [0.0, s, top + offset]])
    return window, to_original


# ----------------------------------------------------------------------------- images


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decodes image bytes to RGB uint8 [H, W, 3] (greyscale and RGBA -> RGB)."""
    if not data:
        raise DatasetFormatError(
            f"{name}: the image file is empty (0 bytes); the download or copy may be incomplete."
        )
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), _IMREAD_FLAGS)
    except cv2.error as e:  # OpenCV raises for some malformed buffers instead of returning None
        raise DatasetFormatError(f"{name}: cannot decode the image ({e.msg.strip()}).") from None
    if array is None or array.size == 0:
        raise DatasetFormatError(f"{name}: cannot decode the image (corrupt or not an image file).")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [H, W, 1|3|4] -> [H, W, 3]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    return np.ascontiguousarray(image, np.uint8)


def encode_jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return buf.tobytes()


# ----------------------------------------------------------------------------- examples


def base_features(
    num_landmarks: int, **extra: tfds.features.FeatureConnector
) -> tfds.features.FeaturesDict:
    """Features every builder stores (see the Datasets section of contracts.md)."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "landmarks": tfds.features.Tensor(shape=(num_landmarks, 2), dtype=np.float32),
            "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "to_original": tfds.features.Tensor(shape=(2, 3), dtype=np.float32),
            "original_landmarks": tfds.features.Tensor(shape=(num_landmarks, 2), dtype=np.float32),
            "file_name": tfds.features.Text(),
            **extra,
        }
    )


def make_example(
    image: np.ndarray,
    original_landmarks: np.ndarray,
    box: np.ndarray,
    file_name: str,
    **extra: Any,
) -> dict[str, Any]:
    """Crops one face and returns the feature dict (image already JPEG bytes).

    Args:
        image: RGB uint8 [H, W, 3], the original image.
        original_landmarks: [L, 2] 0-based, original frame. Points outside the image are kept.
        box: x0, y0, x1, y1 in the original frame (the dataset's box or the landmark box).
        file_name: where the face came from, relative to the dataset root.
        **extra: dataset-specific features, stored as given.
    """
    crop, to_original = crop_with_margin(image, box)
    from_original = invert_affine(to_original)
    corners = apply_affine(from_original, np.reshape(np.asarray(box, np.float64), (2, 2)))
    return {
        "image": encode_jpeg(crop),
        "landmarks": apply_affine(from_original, original_landmarks).astype(np.float32),
        "box": corners.reshape(4).astype(np.float32),
        "to_original": to_original.astype(np.float32),
        "original_landmarks": np.asarray(original_landmarks, np.float32),
        "file_name": file_name,
        **extra,
    }


# ----------------------------------------------------------------------------- files


class FileSource:
    """Read-only view of a folder or an archive: relative names -> bytes."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def read_many(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """Yields (name, bytes), in whatever order reads the source fastest."""
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        return next(iter(self.read_many([name])))[1]

    def describe(self, name: str) -> str:
        """Where `name` lives, for error messages."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _skip_member(name: str) -> bool:
    # macOS zip droppings carry the same names as the real files.
    parts = name.split("/")
    return any(p == "__MACOSX" for p in parts) or parts[-1].startswith("._")


class DirSource(FileSource):
    def __init__(self, root: os.PathLike | str):
        self.root = os.fspath(root)

    def names(self) -> list[str]:
        out = []
        for dirpath, _, files in os.walk(self.root, followlinks=True):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                name = f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")
                if not _skip_member(name):
                    out.append(name)
        return sorted(out)

    def exists(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name))

    def read_many(self, names):
        for name in names:
            with open(os.path.join(self.root, name), "rb") as f:
                yield name, f.read()

    def describe(self, name):
        return os.path.join(self.root, name)


def _normalise_member(name: str, strip_prefix: str, archive: str = "") -> str:
    name = name.replace("\\", "/")
    # Refused as tarfile's 'data' filter refuses them: nothing is extracted, but such a name
    # must not become a member of a split either.
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in name.split("/"):
        raise DatasetFormatError(
            f"{archive}: member {name!r} has an absolute or '..' path; refusing the archive "
            "(it was not written by the dataset's authors)."
        )
    while name.startswith("./"):
        name = name[2:]
    if strip_prefix and name.startswith(strip_prefix + "/"):
        name = name[len(strip_prefix) + 1 :]
    return name


class TarSource(FileSource):
    """A .tar / .tar.gz read in place.

    Gzip streams cannot seek backwards cheaply, so `read_many` reads members in archive
    order: one decompression pass per call instead of one per member.
    """

    def __init__(self, path: os.PathLike | str, strip_prefix: str = ""):
        self.path = os.fspath(path)
        try:
            self._tar = tarfile.open(self.path, "r:*")  # noqa: SIM115 - held open by the source; close() closes it
            self._members = {}
            for m in self._tar.getmembers():
                name = _normalise_member(m.name, strip_prefix, self.path)
                if m.isfile() and not _skip_member(name):
                    self._members[name] = m
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DatasetFormatError(
                f"{self.path}: cannot read the archive ({e}); the download may be incomplete."
            ) from e

    def names(self):
        return sorted(self._members)

    def exists(self, name):
        return name in self._members

    def read_many(self, names):
        for name in sorted(names, key=lambda n: self._members[n].offset_data):
            try:
                yield name, self._tar.extractfile(self._members[name]).read()
            except (tarfile.TarError, EOFError, OSError) as e:
                raise DatasetFormatError(f"{self.describe(name)}: cannot read ({e}).") from e

    def describe(self, name):
        return f"{self.path}:{self._members[name].name if name in self._members else name}"

    def close(self):
        self._tar.close()


class ZipSource(FileSource):
    def __init__(self, path: os.PathLike | str, strip_prefix: str = ""):
        self.path = os.fspath(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetFormatError(
                f"{self.path}: cannot read the archive ({e}); the download may be incomplete."
            ) from e
        self._members = {}
        for info in self._zip.infolist():
            name = _normalise_member(info.filename, strip_prefix, self.path)
            if not info.is_dir() and not _skip_member(name):
                self._members[name] = info

    def names(self):
        return sorted(self._members)

    def exists(self, name):
        return name in self._members

    def read_many(self, names):
        for name in names:
            try:
                yield name, self._zip.read(self._members[name])
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise DatasetFormatError(f"{self.describe(name)}: cannot read ({e}).") from e

    def describe(self, name):
        return f"{self.path}:{self._members[name].filename if name in self._members else name}"

    def close(self):
        self._zip.close()


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def open_archive(path: os.PathLike | str, strip_prefix: str = "") -> FileSource:
    if os.fspath(path).lower().endswith(".zip"):
        return ZipSource(path, strip_prefix)
    return TarSource(path, strip_prefix)


def find_file(root: os.PathLike | str, name: str, max_depth: int = 2) -> str | None:
    """Finds `name` (file or folder) in root or up to max_depth folders below it."""
    root = os.fspath(root)
    frontier = [root]
    for _ in range(max_depth + 1):
        for d in frontier:
            candidate = os.path.join(d, name)
            if os.path.exists(candidate):
                return candidate
        next_frontier = []
        for d in frontier:
            with contextlib.suppress(OSError):
                next_frontier += sorted(e.path for e in os.scandir(d) if e.is_dir())
        frontier = next_frontier
    return None


def manual_dir(dl_manager: tfds.download.DownloadManager, dataset: str, instructions: str) -> str:
    """The manual dir as a path, raising DatasetFilesMissing if it is absent or empty."""
    try:
        path = dl_manager.manual_dir
    except AssertionError:
        # TFDS raises a bare AssertionError for a missing/empty dir; report it our way.
        path = getattr(dl_manager, "_manual_dir", None)
    path = os.fspath(path) if path is not None else "<not set>"
    if not os.path.isdir(path) or not os.listdir(path):
        raise DatasetFilesMissing(
            f"{dataset}: the manual download directory {path} does not exist or is empty.\n\n"
            f"{instructions.strip()}\n\nmanual_dir used: {path}"
        )
    return path


def missing_files(
    dataset: str, path: str, instructions: str, missing: Sequence[str]
) -> DatasetFilesMissing:
    """The error for an incomplete manual dir: what is missing, then the instructions."""
    shown = list(missing[:10]) + (
        [f"... and {len(missing) - 10} more"] if len(missing) > 10 else []
    )
    lines = "\n  ".join(shown)
    return DatasetFilesMissing(
        f"{dataset}: the manual download directory {path} is incomplete. Missing:\n  {lines}\n\n"
        f"{instructions.strip()}\n\nmanual_dir used: {path}"
    )


# ----------------------------------------------------------------------------- builder base


class LandmarkBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """GeneratorBasedBuilder that writes array_record unless told otherwise."""

    # TFDS 4.9.10's own `code_path` touches `importlib_resources` (a py<3.9-only
    # dependency, absent here) for any builder outside tensorflow_datasets.
    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format, **kwargs)
        # array_record gives random access (tfds.data_source / grain); TFDS's default is
        # tfrecord. A dataset already on disk keeps the format it was written in.
        if file_format is None and not (self.data_path / "dataset_info.json").exists():
            self.info.set_file_format("array_record", override=True)


@dataclasses.dataclass
class BuildSummary:
    """Counts printed at the end of a split, so a user sees what was read."""

    dataset: str
    split: str
    examples: int = 0
    images: int = 0

    def __str__(self) -> str:
        return f"{self.dataset}/{self.split}: {self.examples} faces from {self.images} images"


def report(summary: BuildSummary, official: int | None = None) -> None:
    """Prints a split's counts; flags a size that differs from the published one."""
    note = ""
    if official is not None and summary.examples != official:
        note = f" (the published split has {official})"
    print(f"{summary}{note}", flush=True)


# ----------------------------------------------------------------------------- fixtures
# Helpers for the fixture writers (datasets/<name>/fixtures.py): tiny fake downloads in
# the real formats, for tests and for timing builds.


def fixture_image(width: int, height: int, seed: int) -> np.ndarray:
    """RGB uint8 with smooth ramps (so crops can be checked pixel by pixel after JPEG)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 20 + 200 * x / max(width - 1, 1)
    g = 20 + 200 * y / max(height - 1, 1)
    b = np.full_like(x, 40 + (37 * seed) % 180)
    return np.clip(np.stack([r, g, b], -1) + 0.5, 0, 255).astype(np.uint8)


def fixture_landmarks(rng: np.random.Generator, n: int, box: Sequence[float]) -> np.ndarray:
    """n points spread over box x0, y0, x1, y1 (an ellipse outline plus inner points)."""
    x0, y0, x1, y1 = box
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = np.where(np.arange(n) % 2 == 0, 0.5, 0.3)
    u = 0.5 + radius * np.cos(t) + rng.uniform(-0.03, 0.03, n)
    v = 0.5 + radius * np.sin(t) + rng.uniform(-0.03, 0.03, n)
    return np.stack([x0 + u * (x1 - x0), y0 + v * (y1 - y0)], -1)


def encode_file(image: np.ndarray, ext: str) -> bytes:
    """Encodes RGB or greyscale uint8 as .jpg/.png bytes (a fixture's 'original' file)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(ext, image, [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else [])
    assert ok
    return buf.tobytes()
