"""fan_jax.predict: geometry of the crop/decode/map-back chain, batching, detection, the CLI.

The geometry tests use a parameter-free stand-in model whose heatmaps are the pooled
colour channels of the crop, so a coloured dot in the photo must come back as a landmark
at the dot, whatever the face box. The end-to-end tests use a MobileFAN briefly trained
by `fan_jax.train` on synthetic faces (`trained_student_workdir`, shared with
test_export.py and trained once per test session).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from fan_jax import geometry, predict, synthetic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_IMAGE_SIZE = 96
NUM_TRAIN_FACES = 32


# --------------------------------------------------------------------------- shared model


def _load_default_config():
    spec = importlib.util.spec_from_file_location(
        "_fan_jax_default_config", os.path.join(REPO_ROOT, "configs", "default.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def train_faces(indices) -> list[tuple[np.ndarray, np.ndarray]]:
    return [synthetic.render_face(i, size=TRAIN_IMAGE_SIZE) for i in indices]


def _train_student(workdir: str, steps: int = 250) -> None:
    from fan_jax import train

    c = _load_default_config()
    c.dataset.name = "300w"
    c.dataset.prepare = False
    c.augment.box_source = "landmarks"
    c.augment.p_rotate = 0.0
    c.augment.scale_range = (0.95, 1.05)
    c.input_size = 64
    c.train.batch_size = 8
    c.train.num_train_steps = steps
    c.train.learning_rate = 2e-3
    c.train.lr_decay_epochs = ()
    c.train.log_every_steps = 50
    c.train.eval_every_steps = -1
    c.train.checkpoint_every_steps = 10 * steps  # only the final checkpoint
    source = [
        {"image": img, "landmarks": lm, "box": geometry.box_from_landmarks(lm)}
        for img, lm in train_faces(range(NUM_TRAIN_FACES))
    ]
    train.train_and_evaluate(c, workdir, sources={"train": source}, evaluate_at_end=False)


def trained_student_workdir(tmp_path_factory) -> str:
    """A workdir with a MobileFAN (64x64 input, 68 landmarks) trained 250 steps on synthetic
    faces; built once per session and shared by the pytest-xdist workers through a lock.
    FAN_JAX_TEST_TRAINED_WORKDIR names an existing one to reuse (local iteration)."""
    reuse = os.environ.get("FAN_JAX_TEST_TRAINED_WORKDIR")
    if reuse and os.path.exists(os.path.join(reuse, "config.json")):
        return reuse
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    workdir = os.path.join(str(root), "fan_jax_trained_student")
    with open(workdir + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(workdir, "config.json")):
            tmp = workdir + ".partial"
            shutil.rmtree(tmp, ignore_errors=True)
            _train_student(tmp)
            os.rename(tmp, workdir)
    return workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return trained_student_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(workdir):
    return predict.Predictor.from_workdir(workdir)


# --------------------------------------------------------------------------- stand-in model


class ColourDots:
    """A parameter-free 'model': heatmap channel k is the 4x4-pooled colour channel k of the
    normalised crop, so its peak sits on a bright dot of that colour."""

    def __init__(self, channels=(0, 1)):
        self.channels = tuple(channels)

    def apply(self, variables, x, train=False):
        import jax.numpy as jnp

        del variables, train
        b, h, w, _ = x.shape
        pooled = x.reshape(b, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4))
        return jnp.stack([pooled[..., c] for c in self.channels], axis=-1), ()


def _stub_predictor(**kw):
    return predict.Predictor({"params": {}}, ColourDots(), num_landmarks=2, input_size=64, **kw)


def _dot_image(h, w, red_xy, green_xy):
    img = np.zeros((h, w, 3), np.uint8)
    for (x, y), colour in ((red_xy, (255, 0, 0)), (green_xy, (0, 255, 0))):
        cv2.circle(img, (int(round(x * 16)), int(round(y * 16))), 3 * 16, colour, -1, shift=4)
    return img


def test_bucket_size():
    assert [predict.bucket_size(n, (1, 2, 4, 8)) for n in (1, 2, 3, 4, 5, 8, 9)] == [
        1,
        2,
        4,
        4,
        8,
        8,
        8,
    ]


@pytest.mark.parametrize(
    "box",
    [
        (40, 30, 140, 130),  # square, centred on the dots
        (20, 50, 160, 110),  # wide: the crop side follows the longer edge
        (-30, -20, 120, 150),  # partly outside the image (zero padding)
    ],
)
def test_landmarks_come_back_in_image_coordinates(box):
    red, green = (70.3, 60.8), (112.6, 101.2)
    img = _dot_image(160, 200, red, green)
    faces = _stub_predictor().predict(img, boxes=[box])
    assert len(faces) == 1
    side = max(box[2] - box[0], box[3] - box[1]) * 1.25
    crop_px = side / 64  # image pixels per crop pixel
    # 4x4 pooling + quarter-pixel decoding: within ~2 crop pixels of the dot's centre.
    np.testing.assert_allclose(faces[0].landmarks, [red, green], atol=2.5 * crop_px)
    np.testing.assert_allclose(faces[0].box, box)


def test_several_faces_and_images_share_batches():
    p = _stub_predictor(buckets=(1, 2, 4, 8))
    a = _dot_image(120, 160, (40, 50), (60, 70))
    b = _dot_image(200, 150, (90, 120), (70, 150))
    # Image a: two boxes around the same dots; b: one.
    res = p.predict_many([a, b], [[(20, 30, 80, 90), (10, 20, 90, 100)], [(40, 80, 130, 170)]])
    assert [len(r) for r in res] == [2, 1]
    for face in res[0]:
        np.testing.assert_allclose(face.landmarks, [(40, 50), (60, 70)], atol=4.0)
    np.testing.assert_allclose(res[1][0].landmarks, [(90, 120), (70, 150)], atol=5.0)
    assert p.traced_batch_sizes == [4]  # three crops, one padded batch


def test_compiles_once_per_bucket():
    p = _stub_predictor(buckets=(1, 2, 4, 8))
    crops = np.zeros((11, 64, 64, 3), np.uint8)
    for n in (3, 4, 1, 3, 11):
        pts, scores = p.predict_crops(crops[:n])
        assert pts.shape == (n, 2, 2) and scores.shape == (n, 2)
    # 3 -> 4, 4 -> 4 (cached), 1 -> 1, 3 -> 4 (cached), 11 -> 8 + 4 (both cached but 8).
    assert p.traced_batch_sizes == [4, 1, 8]


def test_padding_does_not_change_results():
    p = _stub_predictor(buckets=(1, 8))
    img = _dot_image(100, 100, (30, 40), (60, 70))
    crop, _ = p.crop(img, (10, 10, 90, 90))
    one, _ = p.predict_crops(crop[None])
    many, _ = p.predict_crops(np.stack([crop, np.zeros_like(crop), crop]))
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[0], many[2])


def test_flip_test_needs_a_known_landmark_count():
    with pytest.raises(ValueError, match="no flip permutation"):
        _stub_predictor(flip_test=True)


def test_grey_and_float_images_are_accepted():
    p = _stub_predictor()
    img = _dot_image(100, 100, (30, 40), (60, 70))
    base = p.predict(img, boxes=[(10, 10, 90, 90)])[0].landmarks
    as_float = p.predict(img.astype(np.float32) / 255.0, boxes=[(10, 10, 90, 90)])[0].landmarks
    np.testing.assert_allclose(as_float, base)
    grey = p.predict(img[..., 0], boxes=[(10, 10, 90, 90)])  # only the red dot remains
    assert grey[0].landmarks.shape == (2, 2)


# --------------------------------------------------------------------------- detection


ASTRONAUT_FACE = (177, 72, 270, 165)  # where the cascade and a person put her face


# --------------------------------------------------------------------------- trained model


def _box_frame(points, box):
    """Points in units of the box: (p - top-left) / width."""
    return (points - box[:2]) / (box[2] - box[0])


def test_trained_model_finds_landmarks_of_synthetic_faces(trained):
    faces = train_faces(range(8))
    mean_shape = np.mean(
        [
            _box_frame(lm, geometry.box_from_landmarks(lm))
            for _, lm in train_faces(range(NUM_TRAIN_FACES))
        ],
        axis=0,
    )
    boxes = [geometry.box_from_landmarks(lm) for _, lm in faces]
    res = trained.predict_many([img for img, _ in faces], [b[None] for b in boxes])
    errors, baseline = [], []
    for (_, lm), r, box in zip(faces, res, boxes):
        assert len(r) == 1 and r[0].landmarks.shape == (68, 2)
        truth = _box_frame(lm, box)
        errors.append(np.linalg.norm(_box_frame(r[0].landmarks, box) - truth, axis=-1).mean())
        baseline.append(np.linalg.norm(mean_shape - truth, axis=-1).mean())
        assert r[0].scores.shape == (68,) and np.median(r[0].scores) > 0.2
    # 250 steps on 32 faces: clearly better than the mean face placed in the box (a wrong
    # stride, inverse or flip would be far worse than that baseline).
    assert max(errors) < 0.15, errors
    assert np.mean(errors) < 0.8 * np.mean(baseline), (errors, baseline)


def test_flip_test_agrees_with_the_plain_prediction(trained):
    flip = predict.Predictor(
        trained.variables, trained.model, 68, trained.input_size, flip_test=True
    )
    faces = train_faces(range(4, 8))
    boxes = [geometry.box_from_landmarks(lm)[None] for _, lm in faces]
    plain = trained.predict_many([f[0] for f in faces], boxes)
    flipped = flip.predict_many([f[0] for f in faces], boxes)
    for (_, lm), a, b, box in zip(faces, plain, flipped, boxes):
        size = box[0, 2] - box[0, 0]
        # The mirror's heatmaps are re-ordered by the 68-point permutation: a wrong
        # permutation would swap left and right points by a large fraction of the face.
        assert np.linalg.norm(b[0].landmarks - lm, axis=-1).mean() / size < 0.15
        assert np.linalg.norm(b[0].landmarks - a[0].landmarks, axis=-1).mean() / size < 0.06


def test_from_checkpoint_equals_from_workdir(workdir, trained):
    step_dir = os.path.join(
        workdir, "checkpoints", os.listdir(os.path.join(workdir, "checkpoints"))[0]
    )
    other = predict.Predictor.from_checkpoint(step_dir)
    img, lm = synthetic.render_face(3, size=TRAIN_IMAGE_SIZE)
    box = geometry.box_from_landmarks(lm)
    np.testing.assert_array_equal(
        other.predict(img, [box])[0].landmarks, trained.predict(img, [box])[0].landmarks
    )
    assert other.info["step"] == trained.info["step"] == 250
    assert other.info["num_landmarks"] == 68 and other.input_size == 64


def test_trained_model_on_the_astronaut(trained):
    from skimage import data

    faces = trained.predict(data.astronaut())
    assert len(faces) == 1
    lm = faces[0].landmarks
    assert lm.shape == (68, 2)
    # Trained on cartoons only: the points are not accurate, but they land on her head.
    x0, y0, x1, y1 = ASTRONAUT_FACE
    centre = lm.mean(axis=0)
    assert x0 - 40 < centre[0] < x1 + 40 and y0 - 40 < centre[1] < y1 + 60


# --------------------------------------------------------------------------- files and CLI


def test_read_image_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name, msg in (
        ("notes.txt", "not an image"),
        ("empty.png", "not an image"),
        ("missing.jpg", "no such file"),
    ):
        with pytest.raises(predict.ImageReadError, match=msg):
            predict.read_image(str(tmp_path / name))
    with pytest.raises(predict.ImageReadError, match="directory"):
        predict.read_image(str(tmp_path))
    img = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    cv2.imwrite(str(tmp_path / "ok.png"), img[..., ::-1])
    np.testing.assert_array_equal(predict.read_image(str(tmp_path / "ok.png")), img)


def test_parse_box():
    np.testing.assert_allclose(predict.parse_box("1,2.5,30,40"), [1, 2.5, 30, 40])
    for bad in ("1,2,3", "a,b,c,d", "10,10,5,20"):
        with pytest.raises(ValueError, match="x0,y0,x1,y1"):
            predict.parse_box(bad)


def test_draw_faces_marks_the_landmarks():
    img = np.zeros((100, 120, 3), np.uint8)
    face = predict.Face(
        box=np.array([10, 10, 90, 90], np.float32),
        landmarks=np.array([[30, 40], [70.5, 60.25]], np.float32),
        scores=np.ones(2, np.float32),
    )
    out = predict.draw_faces(img, [face])
    assert img.sum() == 0 and out.shape == img.shape
    assert out[40, 30, 1] > 200 and out[60, 70, 1] > 100
    assert out[5, 5].sum() == 0


def _write(path, rgb):
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return str(path)


def test_cli_reports_every_image_and_fails_on_bad_ones(workdir, tmp_path, capsys):
    img, lm = synthetic.render_face(2, size=TRAIN_IMAGE_SIZE)
    good = _write(tmp_path / "face.png", img)
    text = tmp_path / "readme.jpg"
    text.write_text("hello")
    box = ",".join(str(float(v)) for v in geometry.box_from_landmarks(lm))
    out_json = tmp_path / "out.json"
    code = predict.main(
        [
            "--workdir",
            workdir,
            good,
            str(text),
            str(tmp_path / "nope.png"),
            "--box",
            box,
            "--draw",
            str(tmp_path / "drawn"),
            "-o",
            str(out_json),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "readme.jpg: not an image" in err and "nope.png: no such file" in err
    report = json.loads(out_json.read_text())
    assert [r["path"] for r in report["images"]] == [good, str(text), str(tmp_path / "nope.png")]
    first = report["images"][0]
    assert "error" not in first and len(first["faces"]) == 1
    face = first["faces"][0]
    assert len(face["landmarks"]) == 68 and len(face["scores"]) == 68
    np.testing.assert_allclose(face["box"], [float(v) for v in box.split(",")], atol=0.01)
    assert np.linalg.norm(np.array(face["landmarks"]) - lm, axis=-1).mean() < 0.15 * (
        face["box"][2] - face["box"][0]
    )
    assert report["images"][1]["faces"] == [] and "error" in report["images"][1]
    drawn = tmp_path / "drawn" / "face.png"
    assert drawn.exists() and first["drawn"] == str(drawn)
    assert not (tmp_path / "drawn" / "readme.png").exists()
    assert report["model"]["num_landmarks"] == 68


def test_cli_detects_faces_and_says_when_there_is_none(workdir, tmp_path, capsys):
    from skimage import data

    astro = _write(tmp_path / "astronaut.png", data.astronaut())
    blank = _write(tmp_path / "blank.png", np.full((120, 160, 3), 90, np.uint8))
    code = predict.main(["--workdir", workdir, astro, blank])
    captured = capsys.readouterr()
    assert code == 1
    assert "blank.png: no face found" in captured.err
    report = json.loads(captured.out)
    assert len(report["images"][0]["faces"]) == 1
    assert report["images"][1]["faces"] == [] and "no face" in report["images"][1]["error"]
    assert predict.main(["--workdir", workdir, astro]) == 0
    capsys.readouterr()


def test_cli_checkpoint_errors(workdir, tmp_path, capsys):
    assert predict.main(["--workdir", str(tmp_path / "missing"), "x.png"]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model": {"name": "mobilefan"}}))
    assert predict.main(["--workdir", str(empty), "x.png"]) == 2
    assert "no checkpoints" in capsys.readouterr().err
    # A config that names another architecture than the checkpoint holds.
    wrong = tmp_path / "wrong"
    shutil.copytree(workdir, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["model"]["name"] = "mobilefan_0.5"
    (wrong / "config.json").write_text(json.dumps(cfg))
    assert predict.main(["--workdir", str(wrong), "x.png"]) == 2
    err = capsys.readouterr().err
    assert "does not fit model 'mobilefan_0.5'" in err and "shape" in err
    assert predict.main(["--checkpoint", str(tmp_path / "nowhere" / "7"), "x.png"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_bad_box_is_a_usage_error(workdir, capsys):
    assert predict.main(["--workdir", workdir, "x.png", "--box", "1,2,3"]) == 2
    assert "x0,y0,x1,y1" in capsys.readouterr().err
