"""fan_jax.detect: the detectors on real photos, and their boxes against the training crop.

The reference faces (tests/data/reference_faces.json) are the 68 300W-layout landmarks that
dlib's shape predictor puts on scikit-image's astronaut, matplotlib's Grace Hopper and 20
LFW faces (`benchmarks/detectors.py --write_reference`). Training crops around the box of
a face's landmarks; a calibrated detector box must give that crop.
"""

from __future__ import annotations

import importlib.util
import json
import os

import cv2
import numpy as np
import pytest

from fan_jax import detect, geometry, predict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(detect.DETECTORS)


def _bench():
    spec = importlib.util.spec_from_file_location(
        "_detector_bench", os.path.join(REPO_ROOT, "benchmarks", "detectors.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def reference(bench):
    """[(image, true box, 68 landmarks)] rebuilt from the same photos the fixture was made on."""
    with open(os.path.join(REPO_ROOT, "tests", "data", "reference_faces.json")) as f:
        ref = json.load(f)["faces"]
    photos = {name: img for name, img, _ in bench.photo_sets()["frontal"]}
    return [(photos[r["photo"]], r["box"], np.asarray(r["landmarks"])) for r in ref]


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize("name", NAMES)
def test_finds_the_astronaut_and_nothing_in_a_blank_image(name):
    from skimage import data

    det = detect.make_detector(name)
    boxes = det(data.astronaut())
    assert len(boxes) == 1
    assert _iou(boxes[0], (179, 87, 272, 178)) > 0.6  # her 68 landmarks' box
    assert len(det(np.full((300, 400, 3), 128, np.uint8))) == 0


@pytest.mark.parametrize("name", NAMES)
def test_calibrated_box_gives_the_training_crop(name, reference, bench):
    """Per face: the crop from the detector's box vs the crop from the landmarks' box."""
    det = detect.make_detector(name)
    shifts, sides = [], []
    for img, truth, lm in reference:
        boxes = det(img)
        _, _, pairs = bench.match(boxes, [truth])
        if not pairs:
            continue
        want = geometry.crop_transform(geometry.box_from_landmarks(lm), 256, 1.25)
        got = geometry.crop_transform(boxes[pairs[0][0]], 256, 1.25)
        # A crop transform is s * x + t: compare where the landmarks' centre lands, and s.
        centre = lm.mean(axis=0)
        shifts.append((got[:, :2] @ centre + got[:, 2] - (want[:, :2] @ centre + want[:, 2])) / 256)
        sides.append(got[0, 0] / want[0, 0])
    assert len(shifts) >= 18, f"{name} found only {len(shifts)} of {len(reference)} faces"
    shifts = np.asarray(shifts)
    # No bias: the median face sits within 2% of the crop of where training put it, at
    # within 5% of its scale. Each face scatters more (the detector's own noise), but within
    # the training augmentation (translation +-5% of the crop, scale +-25%).
    bias = np.median(shifts, axis=0)
    assert np.all(np.abs(bias) < 0.02), bias
    assert abs(np.median(sides) - 1) < 0.05, np.median(sides)
    assert np.median(np.linalg.norm(shifts, axis=1)) < 0.07
    assert np.percentile(np.abs(np.log(sides)), 90) < np.log(1.25)


def test_an_uncalibrated_box_fails_the_crop_check(reference, bench):
    """The check above can fail: the raw HOG box is off by more than its tolerance."""
    det = detect.make_detector("dlib")
    raw = detect.Calibration()
    errs = []
    for img, truth, lm in reference:
        boxes = raw.apply(det.raw(img))
        _, _, pairs = bench.match(boxes, [truth])
        if pairs:
            want = geometry.box_from_landmarks(lm)
            b = boxes[pairs[0][0]]
            errs.append(
                (0.5 * (b[1] + b[3]) - 0.5 * (want[1] + want[3])) / (1.25 * (want[3] - want[1]))
            )
    assert abs(np.median(errs)) > 0.05  # the crop is off by more than the 2% allowed above


def test_calibration_maps_boxes():
    cal = detect.Calibration(scale=2.0, dx=0.25, dy=-0.5)
    np.testing.assert_allclose(cal.apply([[10, 20, 30, 30]]), [[5, -5, 45, 35]])
    assert detect.Calibration().apply(np.zeros((0, 4))).shape == (0, 4)


def test_dlib_finds_rotated_faces_the_cascade_misses(bench):
    from skimage import data

    img, truth = bench._rotate(data.astronaut(), bench.ASTRONAUT, 30)
    assert len(bench.match(detect.make_detector("dlib")(img), truth)[2]) == 1
    assert len(bench.match(detect.make_detector("lbp")(img), truth)[2]) == 0


def test_auto_is_dlib_when_installed_and_unknown_names_are_errors():
    assert isinstance(detect.make_detector("auto"), detect.DlibDetector)
    with pytest.raises(ValueError, match="unknown detector 'mtcnn'"):
        detect.make_detector("mtcnn")


def test_suppress_overlaps_keeps_the_largest_of_each_cluster():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 12, 12], [50, 50, 60, 60], [2, 2, 6, 6], [40, 40, 70, 70]],
        np.float32,
    )
    np.testing.assert_array_equal(
        detect.suppress_overlaps(boxes), [[40, 40, 70, 70], [1, 1, 12, 12]]
    )
    assert detect.suppress_overlaps(np.zeros((0, 4))).shape == (0, 4)


@pytest.mark.parametrize("name", NAMES)
def test_boxes_of_large_images_are_scaled_back(name):
    from skimage import data

    img = data.astronaut()
    big = cv2.resize(img, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    det = detect.make_detector(name, max_side=512)
    np.testing.assert_allclose(det(big)[0] / 2, det(img)[0], atol=12)


def test_predict_keeps_its_old_names():
    assert predict.FaceDetector is detect.LBPDetector
    assert predict.suppress_overlaps is detect.suppress_overlaps
