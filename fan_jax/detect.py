"""Face detectors for `fan_jax.predict` and `fan_jax.video`, calibrated to the training crop.

    from fan_jax import detect
    boxes = detect.make_detector("auto")(rgb_uint8)   # [F, 4] x0, y0, x1, y1, largest first

Detectors (`DETECTORS`; `benchmarks/detectors.py` measures them on real photos):
- 'dlib': dlib's HOG + linear SVM frontal detector (five poses, in the `dlib-bin` wheel with
  its weights; `pip install -e ".[detect]"`). On the benchmark's photos it finds the faces
  rotated by +-30 degrees that LBP misses (172 of 204 against 3), as many small ones, with no
  false positive, in half LBP's time.
- 'lbp': scikit-image's bundled LBP frontal cascade (OpenCV's). Always available: the
  fallback when dlib is not installed.
- 'auto': 'dlib' when importable, else 'lbp'.

Each detector's native box has its own convention (HOG: eyebrows to lip; LBP: forehead to
mouth), while the models were trained on crops around the box of the face's landmarks
(`geometry.box_from_landmarks`, side x 1.25). A `Calibration` maps a native box to that
landmark box: the side scaled by `scale` and the centre moved by (dx, dy) native sides. The
constants below are medians measured by `python benchmarks/detectors.py --calibrate`
against the 68-point (300W layout) landmarks of dlib's shape predictor on real photos.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import cv2
import numpy as np

Detector = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Native box -> landmark box: square, side `scale` x the native long side, centre moved by
    (dx, dy) native sides."""

    scale: float = 1.0
    dx: float = 0.0
    dy: float = 0.0

    def apply(self, boxes: np.ndarray) -> np.ndarray:
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
        cx = 0.5 * (b[:, 0] + b[:, 2]) + self.dx * side
        cy = 0.5 * (b[:, 1] + b[:, 3]) + self.dy * side
        half = 0.5 * self.scale * side
        return np.stack([cx - half, cy - half, cx + half, cy + half], axis=1)


def suppress_overlaps(boxes: np.ndarray, max_iou: float = 0.3) -> np.ndarray:
    """Largest first; drops a box overlapping a kept one (IoU > max_iou or centre inside)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return boxes[kept_indices(boxes, max_iou)].reshape(-1, 4)


def kept_indices(boxes: np.ndarray, max_iou: float = 0.3) -> np.ndarray:
    """The indices `suppress_overlaps` keeps, in its order (largest first)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept: list[np.ndarray] = []
    kept_idx: list[int] = []
    for i in np.argsort(-area, kind="stable"):
        b = boxes[i]
        cx, cy = 0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3])
        ok = True
        for k in kept:
            iw = max(0.0, min(b[2], k[2]) - max(b[0], k[0]))
            ih = max(0.0, min(b[3], k[3]) - max(b[1], k[1]))
            inter = iw * ih
            union = area[i] + (k[2] - k[0]) * (k[3] - k[1]) - inter
            if inter / union > max_iou or (k[0] <= cx <= k[2] and k[1] <= cy <= k[3]):
                ok = False
                break
        if ok:
            kept.append(b)
            kept_idx.append(int(i))
    return np.asarray(kept_idx, np.int64)


def _downscale(image: np.ndarray, max_side: float) -> tuple[np.ndarray, float]:
    h, w = image.shape[:2]
    r = min(1.0, max_side / max(h, w))
    if r < 1.0:
        image = cv2.resize(image, (round(w * r), round(h * r)), interpolation=cv2.INTER_AREA)
    return image, r


class LBPDetector:
    """Frontal faces with scikit-image's bundled LBP cascade (OpenCV's, as shipped in skimage).

    Slow (the cascade loops over positions in Python), so it searches a copy downscaled to
    `max_side`. Boxes are calibrated (`CALIBRATION`), largest first.
    """

    name = "lbp"
    CALIBRATION = Calibration(scale=0.874, dx=0.02, dy=0.151)

    def __init__(
        self,
        scale_factor: float = 1.1,
        min_neighbors: int = 8,
        min_size_frac: float = 0.08,
        max_side: int = 640,
        calibration: Calibration | None = None,
    ):
        try:
            from skimage import data
            from skimage.feature import Cascade
        except ImportError:
            raise RuntimeError(
                "face detection needs scikit-image (pip install scikit-image); "
                "or pass face boxes (--box x0,y0,x1,y1)"
            ) from None
        self._cascade = Cascade(data.lbp_frontal_face_cascade_filename())
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size_frac = min_size_frac
        self.max_side = max_side
        self.calibration = calibration or self.CALIBRATION

    def raw(self, image: np.ndarray) -> np.ndarray:
        """The cascade's own boxes (x0, y0, x1, y1) in image pixels, unsorted."""
        grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        grey, r = _downscale(grey, self.max_side)
        side = min(grey.shape)
        min_size = max(24, int(side * self.min_size_frac))
        found = self._cascade.detect_multi_scale(
            img=grey.astype(np.float32) / 255.0,
            scale_factor=self.scale_factor,
            step_ratio=1,
            min_size=(min_size, min_size),
            max_size=(side, side),
            min_neighbor_number=self.min_neighbors,
        )
        return np.asarray(
            [
                [d["c"] / r, d["r"] / r, (d["c"] + d["width"]) / r, (d["r"] + d["height"]) / r]
                for d in found
            ],
            np.float32,
        ).reshape(-1, 4)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return suppress_overlaps(self.calibration.apply(self.raw(image)))


class DlibDetector:
    """dlib's HOG frontal face detector (front, left, right and two in-plane-rotated filters).

    `upsample` doubles the image that many times first: 1 finds faces down to about 40 px
    (80 px at 0) and costs about 4x. Images larger than `max_side` are searched downscaled.
    `threshold` is added to the SVM's: lower finds more faces and more false positives. At
    0 it also fires on the astronaut's mission patch; 0.15 drops that and costs 3-5% of the
    faces in benchmarks/detectors.py (chosen on those photos).
    """

    name = "dlib"
    # Per upsample count: the pyramid level a face is found at changes the box a little.
    CALIBRATIONS: ClassVar[dict[int, Calibration]] = {
        0: Calibration(scale=0.904, dx=-0.007, dy=0.068),
        1: Calibration(scale=1.0, dx=0.024, dy=0.107),
    }

    def __init__(
        self,
        upsample: int = 1,
        threshold: float = 0.15,
        max_side: int = 640,
        calibration: Calibration | None = None,
    ):
        try:
            import dlib
        except ImportError:
            raise RuntimeError(
                "the 'dlib' detector needs dlib: pip install -e \".[detect]\" "
                "(the dlib-bin wheel), or use --detector lbp"
            ) from None
        self._detector = dlib.get_frontal_face_detector()
        self.upsample = int(upsample)
        self.threshold = float(threshold)
        self.max_side = max_side
        self.calibration = calibration or self.CALIBRATIONS[min(self.upsample, 1)]

    # The smallest face (native box side, px) HOG finds without upsampling.
    MIN_FACE_UPSAMPLE_0 = 80

    @property
    def smallest_face_without_upsampling(self) -> float:
        """The smallest landmark-box side `scored(min_face=...)` searches without upsampling
        (~90 px): asking for anything smaller costs the full search (125 ms against 25 ms on
        a 640x480 frame, 2-core Xeon)."""
        return 1.01 * 1.1 * self.MIN_FACE_UPSAMPLE_0 * self.CALIBRATIONS[0].scale  # 1% margin

    def raw(self, image: np.ndarray) -> np.ndarray:
        return self._run(image, self.upsample, self.max_side)[0]

    def _run(
        self, image: np.ndarray, upsample: int, max_side: float
    ) -> tuple[np.ndarray, np.ndarray]:
        small, r = _downscale(np.ascontiguousarray(image), max_side)
        rects, scores, _ = self._detector.run(small, upsample, self.threshold)
        boxes = np.asarray(
            [[d.left() / r, d.top() / r, (d.right() + 1) / r, (d.bottom() + 1) / r] for d in rects],
            np.float32,
        ).reshape(-1, 4)
        return boxes, np.asarray(scores, np.float32).reshape(-1)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return suppress_overlaps(self.calibration.apply(self.raw(image)))

    def scored(
        self, image: np.ndarray, min_face: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(boxes [F, 4] largest first, SVM scores [F]). `min_face` (px, landmark-box side):
        the smallest face wanted; when it is large, the search runs without upsampling on a
        copy scaled so that face is still found (a 150 px face in a 640x480 frame: about
        1/10 of the upsample-1 search's time)."""
        upsample, max_side = self.upsample, float(self.max_side)
        if min_face is not None and min_face > 0:
            # The native HOG box is about 1/scale of the landmark box; keep 10% margin.
            native = float(min_face) / self.CALIBRATIONS[0].scale
            r = 1.1 * self.MIN_FACE_UPSAMPLE_0 / native
            if r <= 1.0:
                upsample = 0
                max_side = min(max_side, r * max(image.shape[:2]))
        boxes, scores = self._run(image, upsample, max_side)
        cal = self.calibration if upsample == self.upsample else self.CALIBRATIONS[min(upsample, 1)]
        boxes = cal.apply(boxes)
        keep = kept_indices(boxes)
        return boxes[keep].reshape(-1, 4), scores[keep]


def scored_detections(
    detector: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    min_face: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(boxes [F, 4], confidence [F]) from any detector: its `scored` method where it has one
    (dlib: the SVM score, about 1 on a frontal face and 0.3 on a typical false positive),
    else its boxes with confidence 1."""
    if hasattr(detector, "scored"):
        boxes, scores = detector.scored(image, min_face=min_face)
    else:
        boxes = np.asarray(detector(image), np.float32).reshape(-1, 4)
        scores = np.ones(len(boxes), np.float32)
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32)


DETECTORS: dict[str, Callable[..., Detector]] = {"dlib": DlibDetector, "lbp": LBPDetector}


def make_detector(name: str = "auto", **kwargs: Any) -> Detector:
    """A detector by name ('auto': dlib when installed, else the LBP cascade)."""
    if name == "auto":
        try:
            return DlibDetector(**kwargs)
        except RuntimeError:
            return LBPDetector(**kwargs)
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {['auto', *sorted(DETECTORS)]}")
    return DETECTORS[name](**kwargs)
