"""From an image to faces with landmarks, whatever runs the network.

`LandmarkPipeline` detects faces (`fan_jax.detect`), crops each the way training cropped
(square, side = max(w, h) * box_scale, `geometry.crop_transform`), runs all crops of all images
in shared batches through `predict_crops`, and maps the landmarks back to the image. Its
subclasses only run crops: `fan_jax.predict.Predictor` (the JAX model of a workdir) and
`fan_jax.exported.ExportedPredictor` (an exported file in its runtime, no JAX).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fan_jax import detect, geometry
from fan_jax.faces import Face
from fan_jax.faces import as_rgb as _as_rgb

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


def bucket_size(n: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
    """The smallest bucket >= n (the largest bucket when n exceeds them all)."""
    for b in buckets:
        if b >= n:
            return b
    return buckets[-1]


class LandmarkPipeline:
    """Detect, crop, `predict_crops`, map back; subclasses give `predict_crops`."""

    def __init__(
        self,
        num_landmarks: int,
        input_size: int,
        *,
        kind: str = "heatmap",
        box_scale: float = 1.25,
        detector: str | Callable[[np.ndarray], np.ndarray] = "auto",
    ):
        self.num_landmarks = int(num_landmarks)
        self.input_size = int(input_size)
        self.kind = kind
        self.box_scale = float(box_scale)
        self._detector = detector
        self.info: dict = {}

    @property
    def detector(self) -> Callable[[np.ndarray], np.ndarray]:
        """The face detector (built on first use from its `fan_jax.detect` name)."""
        if isinstance(self._detector, str):
            self._detector = detect.make_detector(self._detector)
        return self._detector

    def detect(self, image: np.ndarray) -> np.ndarray:
        """Face boxes [F, 4] (x0, y0, x1, y1) in `image`, largest first."""
        return np.asarray(self.detector(_as_rgb(image)), np.float32).reshape(-1, 4)

    def detect_scored(
        self, image: np.ndarray, min_face: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(boxes [F, 4], detector confidence [F]); `min_face` (px): the smallest face
        wanted, which lets a detector search a smaller copy (`detect.scored_detections`)."""
        return detect.scored_detections(self.detector, _as_rgb(image), min_face)

    def crop(
        self, image: np.ndarray, box: Sequence[float] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 crop [S, S, 3], image->crop affine [2, 3]) for one face box."""
        m = geometry.crop_transform(np.asarray(box, np.float64), self.input_size, self.box_scale)
        return geometry.warp_image(_as_rgb(image), m, self.input_size), m

    def warmup(self, batch_sizes: Sequence[int] = (1, 2)) -> None:
        """Runs each batch size once, so no later frame waits for a compilation."""
        for n in batch_sizes:
            self.predict_crops(np.zeros((n, self.input_size, self.input_size, 3), np.uint8))

    def predict_crops(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 crops [N, S, S, 3] -> (landmarks [N, L, 2] in crop pixels, scores [N, L])."""
        raise NotImplementedError

    def predict_many(
        self,
        images: Sequence[np.ndarray],
        boxes: Sequence[np.ndarray | Sequence[Sequence[float]] | None] | None = None,
    ) -> list[list[Face]]:
        """Faces of several images, all crops in shared batches. boxes[i] None: detect."""
        if boxes is None:
            boxes = [None] * len(images)
        if len(boxes) != len(images):
            raise ValueError(f"{len(boxes)} box lists for {len(images)} images")
        crops, mats, owners, face_boxes = [], [], [], []
        for i, (image, bxs) in enumerate(zip(images, boxes)):
            image = _as_rgb(image)
            bxs = self.detect(image) if bxs is None else np.asarray(bxs, np.float32).reshape(-1, 4)
            for box in bxs:
                c, m = self.crop(image, box)
                crops.append(c)
                mats.append(m)
                owners.append(i)
                face_boxes.append(box)
        out: list[list[Face]] = [[] for _ in images]
        if not crops:
            return out
        pts, scores = self.predict_crops(np.stack(crops))
        back = geometry.invert_affine(np.stack(mats))
        orig = geometry.apply_affine(back, pts.astype(np.float64)).astype(np.float32)
        for i, box, lm, sc in zip(owners, face_boxes, orig, scores):
            out[i].append(Face(box=np.asarray(box, np.float32), landmarks=lm, scores=sc))
        return out

    def predict(
        self, image: np.ndarray, boxes: np.ndarray | Sequence[Sequence[float]] | None = None
    ) -> list[Face]:
        """Faces of one RGB image (uint8 [H, W, 3]; grey [H, W] is accepted): detected, or one
        per given box (x0, y0, x1, y1)."""
        return self.predict_many([image], [boxes])[0]

    def __call__(self, image: np.ndarray, boxes: Any = None) -> list[Face]:
        return self.predict(image, boxes)
