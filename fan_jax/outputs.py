"""Output files that never lose what was there before.

Each is written under a temporary name beside it (`out.partial.jsonl` for `out.jsonl`: the
same extension, so OpenCV picks the same container) and moved over the old file only when
the output is complete (`os.replace`, atomic on one filesystem). A run that fails before its
input opened leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import os

import cv2
import numpy as np


def partial_name(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.partial{ext}"


def prepare(path: str) -> str:
    """Makes `path`'s folder and returns the temporary name to write instead."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return partial_name(path)


def commit(path: str) -> None:
    """Moves the finished temporary file over `path`."""
    os.replace(partial_name(path), path)


def discard(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial_name(path))


def write_text(path: str, text: str) -> None:
    tmp = prepare(path)
    with open(tmp, "w") as f:
        f.write(text)
    commit(path)


def write_image(path: str, rgb: np.ndarray) -> None:
    """An RGB image to `path` (format from its extension); OSError if it cannot be encoded."""
    ok, buf = cv2.imencode(
        os.path.splitext(path)[1] or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    )
    if not ok:
        raise OSError(f"{path}: OpenCV cannot write this image format")
    tmp = prepare(path)
    with open(tmp, "wb") as f:
        f.write(buf.tobytes())
    commit(path)
