"""COFW: 29 landmarks with occlusion flags, 1345 train / 507 test faces."""

from __future__ import annotations

import os
from typing import ClassVar

import h5py
import numpy as np
import tensorflow_datasets as tfds

try:
    from fan_jax_datasets import common
except ImportError:  # `tfds build datasets/cofw` from a checkout that is not pip-installed
    import common  # type: ignore[no-redef]

NUM_LANDMARKS = 29
# split -> (file, image cell array, landmarks N x 87, boxes N x 4)
FILES = {
    "train": ("COFW_train_color.mat", "IsTr", "phisTr", "bboxesTr"),
    "test": ("COFW_test_color.mat", "IsT", "phisT", "bboxesT"),
}
OFFICIAL_COUNTS = {"train": 1345, "test": 507}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
COFW cannot be downloaded automatically. From https://data.caltech.edu/records/bc0bf-nc666
download the COFW archive, unzip it, and put these two files in the manual_dir
(default <data_dir>/downloads/manual/; a sub-folder such as COFW/ is found too):

  COFW_train_color.mat   (1345 faces; variables IsTr, phisTr, bboxesTr)
  COFW_test_color.mat    (507 faces; variables IsT, phisT, bboxesT)

Both are MATLAB v7.3 files (HDF5), read with h5py."""


class MatFile:
    """One COFW v7.3 .mat file: MATLAB arrays read through h5py, transposed back."""

    def __init__(self, path: str, images: str, phis: str, boxes: str):
        self.path = path
        self.name = os.path.basename(path)
        self.images_var = images
        try:
            self._file = h5py.File(path, "r")
        except OSError as e:
            raise common.DatasetFormatError(
                f"{path}: not a readable MATLAB v7.3 (HDF5) file ({e}). The COFW *_color.mat "
                "files are v7.3; the download may be incomplete."
            ) from e
        missing = [v for v in (images, phis, boxes) if v not in self._file]
        if missing:
            raise common.DatasetFormatError(
                f"{path}: variables {missing} not found "
                f"(has {sorted(k for k in self._file if k != '#refs#')})."
            )
        # MATLAB is column-major, HDF5 row-major: an N x 87 array is stored 87 x N.
        self.refs = np.asarray(self._file[images]).reshape(-1)
        self.phis = np.asarray(self._file[phis], np.float64).T
        self.boxes = np.asarray(self._file[boxes], np.float64).T
        n = len(self.refs)
        if self.phis.shape != (n, 3 * NUM_LANDMARKS):
            raise common.DatasetFormatError(
                f"{path}: {phis} is {self.phis.shape[::-1]} in HDF5, expected ({3 * NUM_LANDMARKS}, {n}) "
                f"(MATLAB {n} x {3 * NUM_LANDMARKS}: 29 x, 29 y, 29 occlusion flags)."
            )
        if self.boxes.shape != (n, 4):
            raise common.DatasetFormatError(
                f"{path}: {boxes} is {self.boxes.shape[::-1]} in HDF5, expected (4, {n})."
            )
        if not np.all(np.isfinite(self.phis[:, : 2 * NUM_LANDMARKS])):
            raise common.DatasetFormatError(f"{path}: {phis} has non-finite coordinates.")

    def __len__(self) -> int:
        return len(self.refs)

    def describe(self, i: int) -> str:
        return f"{self.name}:{self.images_var}[{i}]"

    def image(self, i: int) -> np.ndarray:
        """Image i as RGB uint8 [H, W, 3] (greyscale images are repeated to 3 channels)."""
        try:
            array = np.asarray(self._file[self.refs[i]])
        except (KeyError, ValueError, OSError, TypeError) as e:
            raise common.DatasetFormatError(
                f"{self.path}: cannot read {self.describe(i)} ({e})."
            ) from e
        if array.ndim not in (2, 3) or array.size == 0:
            raise common.DatasetFormatError(
                f"{self.path}: {self.describe(i)} has shape {array.shape}, not an image."
            )
        array = array.T  # HDF5 (3, W, H) / (W, H) -> (H, W, 3) / (H, W)
        if array.dtype != np.uint8:
            array = np.clip(np.round(array), 0, 255).astype(np.uint8)
        return common.to_rgb(array)

    def landmarks(self, i: int) -> np.ndarray:
        """[29, 2] 0-based: MATLAB's 1-based coordinates minus 1."""
        p = self.phis[i]
        return np.stack([p[:NUM_LANDMARKS], p[NUM_LANDMARKS : 2 * NUM_LANDMARKS]], -1) - 1.0

    def occluded(self, i: int) -> np.ndarray:
        return self.phis[i, 2 * NUM_LANDMARKS :] > 0.5

    def box(self, i: int) -> np.ndarray:
        """x0, y0, x1, y1, 0-based, from MATLAB's 1-based (x, y, w, h)."""
        x, y, w, h = self.boxes[i]
        return np.array([x - 1.0, y - 1.0, x - 1.0 + w, y - 1.0 + h])

    def close(self) -> None:
        self._file.close()


class Builder(common.LandmarkBuilder):
    """COFW (Caltech Occluded Faces in the Wild, colour version) stored as face crops.

    Why crops: one square crop per face (side 2.3 x the box, enough for the +-30 deg /
    0.75-1.25 scale / box x1.25 augmentation; at most 512 px, JPEG) rather than whole
    images keeps decode cost per example and disk use low, and the .mat files need not
    be read at training time.

    The crop is centred on the COFW box (x, y, w, h). Coordinates in the .mat files are
    1-based (MATLAB); 'landmarks', 'original_landmarks' and 'box' are 0-based (minus 1).
    Greyscale images are repeated to 3 channels. 'occluded' holds the 29 occlusion flags.
    Landmarks outside the image are kept (the crop is zero padded there).

    NME is evaluated in the original image frame: 'to_original' maps stored-crop
    coordinates back, and 'original_landmarks' are the annotations (0-based).

    Bad input fails the build naming the file (and the image index): a file that is not
    MATLAB v7.3, missing variables, wrongly shaped arrays, an unreadable image.
    'file_name' is '<mat file>:<variable>[i]' with a 0-based index i.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Face crops with margin, to_original affine, occlusion flags."
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "COFW colour, 29 landmarks with occlusion flags. One example per face: a "
                "square crop with margin and the affine back to the original image."
            ),
            features=common.base_features(
                NUM_LANDMARKS,
                occluded=tfds.features.Tensor(shape=(NUM_LANDMARKS,), dtype=np.bool_),
            ),
            homepage="https://data.caltech.edu/records/bc0bf-nc666",
            citation=(
                "@inproceedings{burgos2013robust, title={Robust face landmark estimation under "
                "occlusion}, author={Burgos-Artizzu, Xavier P. and Perona, Pietro and Doll{\\'a}r, "
                "Piotr}, booktitle={ICCV}, year={2013}}"
            ),
        )

    def _split_generators(self, dl_manager):
        manual = common.manual_dir(dl_manager, "cofw", MANUAL_DOWNLOAD_INSTRUCTIONS)
        paths = {split: common.find_file(manual, spec[0]) for split, spec in FILES.items()}
        missing = [FILES[s][0] for s, p in paths.items() if p is None or not os.path.isfile(p)]
        if missing:
            raise common.missing_files("cofw", manual, MANUAL_DOWNLOAD_INSTRUCTIONS, missing)
        # Open (and validate) both files before writing anything.
        mats = {split: MatFile(paths[split], *FILES[split][1:]) for split in FILES}
        return {split: self._generate_examples(split, mat) for split, mat in mats.items()}

    def _generate_examples(self, split: str, mat: MatFile):
        summary = common.BuildSummary("cofw", split)
        try:
            for i in range(len(mat)):
                summary.images += 1
                summary.examples += 1
                yield (
                    f"{split}_{i:05d}",
                    common.make_example(
                        mat.image(i),
                        mat.landmarks(i),
                        mat.box(i),
                        mat.describe(i),
                        occluded=mat.occluded(i),
                    ),
                )
        finally:
            mat.close()
        common.report(summary, OFFICIAL_COUNTS.get(split))
