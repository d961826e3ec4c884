"""Registry of the landmark datasets and helpers to build and read them.

    spec = DATASETS['300w']            # builder class, landmark count, splits, metric key
    prepare('300w', data_dir, manual_dir)     # builds once (progress bars), then reuses
    source = data_source('300w', 'train', data_dir)   # random access, dicts of numpy

From a shell: python -m fan_jax.data 300w --data_dir D --manual_dir M
(`tfds build datasets/the300w --manual_dir M` finds the builder too, but the tfds CLI of
TFDS 4.9.10 needs apache_beam installed just to start.)

The builders live in `fan_jax_datasets` (top-level folder datasets/); importing them
registers the TFDS names 'wflw', 'the300w' and 'cofw'.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from fan_jax.errors import FanJaxError
from fan_jax_datasets import common
from fan_jax_datasets.cofw import cofw_dataset_builder as _cofw
from fan_jax_datasets.the300w import the300w_dataset_builder as _the300w
from fan_jax_datasets.wflw import wflw_dataset_builder as _wflw

DatasetFilesMissing = common.DatasetFilesMissing
DatasetFormatError = common.DatasetFormatError


class DatasetNotBuiltError(FanJaxError, FileNotFoundError):
    """A reader (eval mode) needs a dataset that is not built where the config says."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str  # our name: 'wflw', '300w', 'cofw'
    builder_cls: type[tfds.core.GeneratorBasedBuilder]
    num_landmarks: int
    train_split: str
    test_splits: tuple[str, ...]  # the first is the headline test set
    normalizer_key: str  # dataset key of fan_jax.metrics.NORMALIZERS

    @property
    def tfds_name(self) -> str:
        return self.builder_cls.name


DATASETS: dict[str, DatasetSpec] = {
    "wflw": DatasetSpec(
        "wflw",
        _wflw.Builder,
        _wflw.NUM_LANDMARKS,
        "train",
        ("test", *_wflw.SUBSET_SPLITS),
        "wflw",
    ),
    "300w": DatasetSpec(
        "300w",
        _the300w.Builder,
        _the300w.NUM_LANDMARKS,
        "train",
        ("full", "common", "challenging"),
        "300w",
    ),
    "cofw": DatasetSpec("cofw", _cofw.Builder, _cofw.NUM_LANDMARKS, "train", ("test",), "cofw"),
}
# TFDS names work too.
_ALIASES = {"the300w": "300w"}


def get(name: str) -> DatasetSpec:
    """The spec for 'wflw', '300w' (or 'the300w') or 'cofw'."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known: {sorted(DATASETS)}.")
    return DATASETS[key]


def builder(
    name: str, data_dir: str | os.PathLike | None = None, **kwargs: Any
) -> tfds.core.DatasetBuilder:
    return get(name).builder_cls(data_dir=os.fspath(data_dir) if data_dir else None, **kwargs)


def prepare(
    name: str,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    **builder_kwargs: Any,
) -> tfds.core.DatasetBuilder:
    """Builds the dataset into data_dir from the files in manual_dir, unless already built.

    Raises DatasetFilesMissing (a FileNotFoundError) naming the missing files, with the
    download instructions, when manual_dir lacks them.
    """
    b = builder(name, data_dir, **builder_kwargs)
    if b.is_prepared():
        print(f"{b.name}: using the prepared dataset in {b.data_dir}", flush=True)
        return b
    with _build_lock(os.path.dirname(os.fspath(b.data_dir))):
        b = builder(name, data_dir, **builder_kwargs)
        if b.is_prepared():  # another process built it while this one waited
            return b
        _remove_stale_builds(os.fspath(b.data_dir))
        print(
            f"{b.name}: building into {b.data_dir} from {manual_dir or 'the default manual_dir'}",
            flush=True,
        )
        config = tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual_dir) if manual_dir else None
        )
        # TFDS shows per-split progress bars (unless tfds.disable_progress_bar() was called).
        b.download_and_prepare(download_config=config)
    return b


@contextlib.contextmanager
def _build_lock(directory: str) -> Iterator[None]:
    """One build of a dataset version at a time (blocking): a second process waits, then finds
    it built. Object stores (gs://) have no locks and are built unguarded."""
    if "://" in directory:
        yield
        return
    import fcntl

    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is building into {directory}", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale_builds(version_dir: str) -> None:
    """Removes what a killed build left (TFDS's `incomplete.XXXXXX_<version>` folders); safe
    under `_build_lock`, where no other build of this dataset is running."""
    if "://" in version_dir:
        return
    parent, version = os.path.split(version_dir.rstrip("/"))
    for stale in glob.glob(os.path.join(parent, f"incomplete.*_{version}")):
        print(f"removing {stale}, left by an interrupted build", flush=True)
        shutil.rmtree(stale, ignore_errors=True)


def data_source(
    name: str, split: str, data_dir: str | os.PathLike | None = None, **kwargs: Any
) -> Any:
    """Random-access source (tfds.data_source) of a prepared dataset's split."""
    spec = get(name)
    b = builder(name, data_dir)
    if not b.is_prepared():
        raise FileNotFoundError(
            f"{spec.tfds_name} is not prepared in {b.data_dir}; run "
            f"fan_jax.data.prepare({spec.name!r}, data_dir, manual_dir) first."
        )
    if split not in b.info.splits:
        raise ValueError(f"{spec.tfds_name} has no split {split!r}; splits: {list(b.info.splits)}.")
    return tfds.data_source(
        spec.tfds_name,
        split=split,
        data_dir=os.fspath(data_dir) if data_dir else None,
        download=False,
        **kwargs,
    )


# --------------------------------------------------------------------------- a config's data


def ensure_built(config: Any) -> None:
    """Builds the config's TFDS dataset from `dataset.manual_dir` unless it is built.

    Missing downloads: prints where to put the files and exits with status 2.
    """
    import jax

    # On several hosts one builds (they share data_dir) while the others wait for it.
    if jax.process_index() == 0:
        try:
            prepare(
                config.dataset.name,
                data_dir=config.dataset.data_dir or None,
                manual_dir=config.dataset.manual_dir or None,
            )
        except DatasetFilesMissing as e:
            print(
                f"\nThe {config.dataset.name} dataset is not built yet and its downloaded "
                f"files are missing.\n\n{e}",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(2)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fan_jax dataset prepared")


def require_built(config: Any) -> None:
    """Raises DatasetNotBuiltError unless the config's dataset is built in its data_dir; builds
    nothing and creates no folder."""
    b = builder(config.dataset.name, config.dataset.data_dir or None)
    if not b.is_prepared():
        name = get(config.dataset.name).name
        raise DatasetNotBuiltError(
            f"dataset.data_dir: {name} is not built in {b.data_dir}. Point "
            f"--config.dataset.data_dir at where the run's data is, or build it with: python -m "
            f"fan_jax.data {name} --data_dir <data_dir> --manual_dir <downloads>"
        )


def sources(config: Any, splits: Sequence[str]) -> dict[str, Any]:
    """Random-access TFDS array_record sources of the config's dataset, one per split."""
    return {
        s: data_source(config.dataset.name, s, config.dataset.data_dir or None)
        for s in dict.fromkeys(splits)
    }


def test_splits(config: Any) -> tuple[str, ...]:
    """`eval.splits`, or every test split of the config's dataset."""
    return tuple(config.eval.splits) or get(config.dataset.name).test_splits


def num_landmarks(config: Any, srcs: Mapping[str, Any] | None = None) -> int:
    """Landmarks per face: of the given sources' first example, else of the dataset."""
    if srcs:
        import numpy as np

        return int(np.asarray(next(iter(srcs.values()))[0]["landmarks"]).shape[0])
    return get(config.dataset.name).num_landmarks


def is_tfds(srcs: Mapping[str, Any]) -> bool:
    """Whether every source is a TFDS data source (not in-memory examples)."""
    return all(type(s).__module__.startswith("tensorflow_datasets") for s in srcs.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build a landmark dataset from its manual download."
    )
    parser.add_argument("name", choices=sorted(DATASETS) + sorted(_ALIASES))
    parser.add_argument(
        "--data_dir", default=None, help="TFDS data dir (default ~/tensorflow_datasets)"
    )
    parser.add_argument(
        "--manual_dir",
        default=None,
        help="folder with the downloaded files (default <data_dir>/downloads/manual)",
    )
    args = parser.parse_args(argv)
    try:
        b = prepare(args.name, args.data_dir, args.manual_dir)
    except (FanJaxError, OSError) as e:  # missing or malformed files, unwritable data_dir
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    for split, info in b.info.splits.items():
        print(f"  {split}: {info.num_examples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
