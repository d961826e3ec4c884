"""WFLW / 300W / COFW builders, end to end from fake downloads in the real formats."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fan_jax import data
from fan_jax_datasets import common
from fan_jax_datasets.cofw import cofw_dataset_builder as cofw_builder
from fan_jax_datasets.cofw import fixtures as cofw_fixtures
from fan_jax_datasets.the300w import fixtures as w300_fixtures
from fan_jax_datasets.the300w import the300w_dataset_builder as w300_builder
from fan_jax_datasets.wflw import fixtures as wflw_fixtures
from fan_jax_datasets.wflw import wflw_dataset_builder as wflw_builder

tfds.disable_progress_bar()


def _build(name: str, data_dir, manual_dir):
    return data.prepare(name, str(data_dir), str(manual_dir))


def _read_split(tfds_name: str, split: str, data_dir) -> list[dict]:
    source = tfds.data_source(tfds_name, split=split, data_dir=str(data_dir))
    out = []
    for i in range(len(source)):
        ex = dict(source[i])
        for k in ("file_name", "subset"):
            if isinstance(ex.get(k), bytes):
                ex[k] = ex[k].decode()
        out.append(ex)
    return out


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Slow, obvious bilinear sampling (pixel centres at integers)."""
    image = image.astype(np.float64)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    h, w = image.shape[:2]
    x0c, x1c = np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)
    y0c, y1c = np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1)
    top = image[y0c, x0c] * (1 - fx) + image[y0c, x1c] * fx
    bottom = image[y1c, x0c] * (1 - fx) + image[y1c, x1c] * fx
    return top * (1 - fy) + bottom * fy


def _check_crop_pixels(ex: dict, original: np.ndarray) -> None:
    """Each stored pixel shows the original pixel that to_original points at (or black)."""
    stored = ex["image"].astype(np.float64)
    side = stored.shape[0]
    assert stored.shape == (side, side, 3)
    ii, jj = np.mgrid[0:side, 0:side]
    pts = common.apply_affine(ex["to_original"], np.stack([jj, ii], -1).astype(np.float64))
    x, y = pts[..., 0], pts[..., 1]
    h, w = original.shape[:2]
    s = ex["to_original"][0, 0]
    # Away from the image border (JPEG rings there), inside and outside the image.
    inside = (x > 2 * s) & (x < w - 1 - 2 * s) & (y > 2 * s) & (y < h - 1 - 2 * s)
    outside = (x < -4 * s) | (x > w - 1 + 4 * s) | (y < -4 * s) | (y > h - 1 + 4 * s)
    assert inside.sum() > 100
    err = np.abs(stored - _bilinear(original, x, y))[inside]
    assert err.mean() < 3 and np.percentile(err, 99) < 12, (err.mean(), err.max())
    if outside.any():
        assert stored[outside].mean() < 4


def _check_geometry(ex: dict, num_landmarks: int) -> None:
    assert ex["landmarks"].shape == (num_landmarks, 2) and ex["landmarks"].dtype == np.float32
    assert ex["original_landmarks"].shape == (num_landmarks, 2)
    assert ex["to_original"].shape == (2, 3) and ex["box"].shape == (4,)
    back = common.apply_affine(ex["to_original"], ex["landmarks"])
    np.testing.assert_allclose(back, ex["original_landmarks"], atol=2e-3)
    # The crop is CROP_MARGIN x the box side (downscaled to <= 512), centred on the box.
    side = ex["image"].shape[0]
    box = ex["box"]
    box_side = max(box[2] - box[0], box[3] - box[1])
    s = ex["to_original"][0, 0]  # original pixels per stored pixel
    window = side * s
    assert (
        common.CROP_MARGIN * box_side * s - 1e-3
        <= window
        < common.CROP_MARGIN * box_side * s + 1 + 1e-3
    )
    assert side == min(round(window), 512)
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    np.testing.assert_allclose(centre, (side - 1) / 2, atol=0.51)


# ----------------------------------------------------------------------------- crop


def test_crop_with_margin_matches_slice_without_downscale():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    box = np.array([60.3, -5.0, 101.7, 30.2])  # sticks out right and top
    crop, to_original = common.crop_with_margin(image, box)
    side = crop.shape[0]
    assert side == int(np.ceil(common.CROP_MARGIN * 41.4 - 1e-6))
    for i in range(side):
        for j in range(side):
            x, y = common.apply_affine(to_original, np.array([j, i], np.float64))
            xi, yi = int(round(x)), int(round(y))
            assert abs(x - xi) < 1e-9 and abs(y - yi) < 1e-9
            want = image[yi, xi] if (0 <= xi < 90 and 0 <= yi < 70) else 0
            np.testing.assert_array_equal(crop[i, j], want)


def test_crop_with_margin_downscales_by_area_average():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (600, 700, 3), dtype=np.uint8)
    w = 1024 / common.CROP_MARGIN  # -> a 1024 px window, halved to 512
    box = np.array([100.0, 50.0, 100.0 + w, 50.0 + w * 0.8])
    crop, to_original = common.crop_with_margin(image, box)
    assert crop.shape == (512, 512, 3)
    np.testing.assert_allclose(to_original[:, :2], 2 * np.eye(2))
    left = to_original[0, 2] - 0.5  # pixel k's centre = left + 2k + 0.5
    top = to_original[1, 2] - 0.5
    assert left == round(left) and top == round(top)
    window = np.zeros((1024, 1024, 3))
    for i in range(1024):  # slow reference: explicit window, then 2x2 block means
        yy = int(top) + i
        if 0 <= yy < 600:
            for j0 in range(0, 1024, 256):
                xs = np.arange(int(left) + j0, int(left) + j0 + 256)
                ok = (xs >= 0) & (xs < 700)
                window[i, j0 : j0 + 256][ok] = image[yy, xs[ok]]
    want = window.reshape(512, 2, 512, 2, 3).mean(axis=(1, 3))
    assert np.abs(crop - want).max() <= 1.0
    centre = common.apply_affine(to_original, np.array([255.5, 255.5]))
    np.testing.assert_allclose(centre, [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], atol=0.5)


def test_decode_image_names_the_file():
    with pytest.raises(common.DatasetFormatError, match="some/file.jpg"):
        common.decode_image(b"not an image", "some/file.jpg")


# ----------------------------------------------------------------------------- WFLW


@pytest.fixture(scope="module")
def wflw_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("wflw")
    fixture = wflw_fixtures.write_fixture(str(root / "manual"))
    _build("wflw", root / "data", root / "manual")
    return fixture, root / "data"


WFLW_SPLITS = ("train", "test", *wflw_builder.SUBSET_SPLITS)


def test_wflw_splits_and_features(wflw_built):
    fixture, data_dir = wflw_built
    for split in WFLW_SPLITS:
        want = fixture.split(split)
        assert want, f"fixture leaves {split} empty"
        got = _read_split("wflw", split, data_dir)
        assert len(got) == len(want), split
        for ex in got:
            _check_geometry(ex, 98)
            matches = [
                f
                for f in want
                if f.image_path == ex["file_name"]
                and np.allclose(f.landmarks, ex["original_landmarks"], atol=1e-4)
            ]
            assert len(matches) == 1, (split, ex["file_name"])
            face = matches[0]
            np.testing.assert_array_equal(ex["attributes"], face.attributes)
            np.testing.assert_allclose(
                common.apply_affine(ex["to_original"], ex["box"].reshape(2, 2)),
                face.box.reshape(2, 2),
                atol=1e-3,
            )
            _check_crop_pixels(ex, fixture.images[face.image_path])


def test_wflw_subsets_are_flagged_test_faces(wflw_built):
    fixture, data_dir = wflw_built
    test_keys = {
        (ex["file_name"], ex["landmarks"].tobytes()) for ex in _read_split("wflw", "test", data_dir)
    }
    for i, split in enumerate(wflw_builder.SUBSET_SPLITS):
        got = _read_split("wflw", split, data_dir)
        assert all(ex["attributes"][i] for ex in got), split
        assert {(ex["file_name"], ex["landmarks"].tobytes()) for ex in got} <= test_keys
    flagged = [f for f in fixture.faces["test"] if f.attributes.any()]
    assert len(flagged) < len(fixture.faces["test"])  # an unflagged face is in no subset


def test_wflw_from_extracted_folders(tmp_path, wflw_built):
    fixture = wflw_fixtures.write_fixture(str(tmp_path / "manual"), extracted=True)
    _build("wflw", tmp_path / "data", tmp_path / "manual")
    _, archive_data = wflw_built
    for split in ("train", "test_blur"):
        a = sorted(
            _read_split("wflw", split, tmp_path / "data"), key=lambda e: e["landmarks"].sum()
        )
        b = sorted(_read_split("wflw", split, archive_data), key=lambda e: e["landmarks"].sum())
        assert len(a) == len(fixture.split(split)) == len(b)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["landmarks"], y["landmarks"])


def _wflw_mutated(tmp_path, mutate):
    tree = tmp_path / "tree"
    wflw_fixtures.write_tree(str(tree))
    mutate(tree)
    wflw_fixtures.pack(str(tree), str(tmp_path / "manual"))
    return tmp_path / "manual"


def test_wflw_malformed_line_names_file_and_line(tmp_path):
    def drop_a_field(tree):
        path = tree / "WFLW_annotations" / wflw_builder.LIST_FILES["train"]
        lines = path.read_text().splitlines()
        lines[1] = lines[1].split(" ", 1)[1]  # 206 fields
        path.write_text("\n".join(lines) + "\n")

    manual = _wflw_mutated(tmp_path, drop_a_field)
    with pytest.raises(
        common.DatasetFormatError, match=r"list_98pt_rect_attr_train\.txt:2: expected 207"
    ):
        _build("wflw", tmp_path / "data", manual)


def test_wflw_missing_image_is_named(tmp_path):
    name = "51--Dresses/51_Dresses_wearingdress_51_377.jpg"
    manual = _wflw_mutated(tmp_path, lambda tree: os.remove(tree / "WFLW_images" / name))
    with pytest.raises(common.DatasetFilesMissing, match=name):
        _build("wflw", tmp_path / "data", manual)


def test_wflw_corrupt_image_is_named(tmp_path):
    name = "37--Soccer/37_Soccer_soccer_ball_37_45.jpg"
    manual = _wflw_mutated(
        tmp_path, lambda tree: (tree / "WFLW_images" / name).write_bytes(b"\xff\xd8 truncated")
    )
    with pytest.raises(common.DatasetFormatError, match=name):
        _build("wflw", tmp_path / "data", manual)


def test_wflw_missing_or_incomplete_manual_dir(tmp_path):
    manual = tmp_path / "nowhere"
    with pytest.raises(common.DatasetFilesMissing) as err:
        _build("wflw", tmp_path / "data", manual)
    msg = str(err.value)
    assert str(manual) in msg and "WFLW_images.tar.gz" in msg and "WFLW_annotations.tar.gz" in msg
    assert "https://wywu.github.io/projects/LAB/WFLW.html" in msg

    wflw_fixtures.write_fixture(str(tmp_path / "full"))
    (tmp_path / "half").mkdir()
    shutil.copy(tmp_path / "full" / "WFLW_annotations.tar.gz", tmp_path / "half")
    pattern = r"(?s)Missing:\n  WFLW_images\.tar\.gz.*manual_dir used: .*half"
    with pytest.raises(common.DatasetFilesMissing, match=pattern):
        _build("wflw", tmp_path / "data", tmp_path / "half")


def test_wflw_truncated_archive_is_named(tmp_path):
    wflw_fixtures.write_fixture(str(tmp_path / "manual"))
    archive = tmp_path / "manual" / "WFLW_images.tar.gz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(
        common.DatasetFormatError, match=r"WFLW_images\.tar\.gz: cannot read the archive"
    ):
        _build("wflw", tmp_path / "data", tmp_path / "manual")


# ----------------------------------------------------------------------------- 300W


@pytest.fixture(scope="module")
def w300_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("300w")
    fixture = w300_fixtures.write_fixture(str(root / "manual"))
    _build("300w", root / "data", root / "manual")
    return fixture, root / "data"


def test_300w_splits_and_features(w300_built):
    fixture, data_dir = w300_built
    counts = {"train": 6, "common": 2, "challenging": 2, "full": 4}
    for split, n in counts.items():
        want = {f.file_name: f for f in fixture.split(split)}
        got = _read_split("the300w", split, data_dir)
        assert len(got) == len(want) == n, split
        assert {ex["file_name"] for ex in got} == set(want)
        for ex in got:
            face = want[ex["file_name"]]
            _check_geometry(ex, 68)
            assert ex["subset"] == face.subset
            # .pts is 1-based; stored original_landmarks are the fixture's 0-based points.
            np.testing.assert_allclose(ex["original_landmarks"], face.landmarks, atol=1e-4)
            np.testing.assert_allclose(
                common.apply_affine(ex["to_original"], ex["box"].reshape(2, 2)),
                common.landmark_box(face.landmarks).reshape(2, 2),
                atol=1e-3,
            )
            _check_crop_pixels(ex, fixture.images[face.file_name])
    names = {ex["file_name"] for ex in _read_split("the300w", "challenging", data_dir)}
    assert "ibug/image_092 _01.jpg" in names
    train = {ex["file_name"]: ex for ex in _read_split("the300w", "train", data_dir)}
    assert train["afw/134212_1.jpg"]["image"].shape == (512, 512, 3)  # 528 px window, downscaled
    assert train["lfpw/trainset/image_0001.png"]["image"].shape[-1] == 3
    outside = train["helen/trainset/10405146_1.jpg"]["original_landmarks"]
    assert (outside[:, 0] < 0).any()  # landmarks outside the image are kept


@pytest.mark.parametrize("archive", ["per_set_zip", "300w.tar.gz"])
def test_300w_from_archives(tmp_path, archive, w300_built):
    fixture = w300_fixtures.write_fixture(str(tmp_path / "manual"), archive=archive)
    _build("300w", tmp_path / "data", tmp_path / "manual")
    _, tree_data = w300_built
    for split in ("train", "full"):
        a = {ex["file_name"]: ex for ex in _read_split("the300w", split, tmp_path / "data")}
        b = {ex["file_name"]: ex for ex in _read_split("the300w", split, tree_data)}
        assert set(a) == set(b) == {f.file_name for f in fixture.split(split)}
        for k in a:
            np.testing.assert_array_equal(a[k]["image"], b[k]["image"])
            np.testing.assert_array_equal(a[k]["original_landmarks"], b[k]["original_landmarks"])


def test_parse_pts_converts_one_based():
    text = "version: 1\nn_points:  3\n{\n1 1\n10.5 2\n3 4.25\n}\n"
    pts = w300_builder.parse_pts(text, "x.pts", expected=3)
    np.testing.assert_array_equal(pts, [[0, 0], [9.5, 1], [2, 3.25]])


def test_300w_wrong_point_count_names_file(tmp_path):
    w300_fixtures.write_fixture(str(tmp_path / "manual"))
    pts = tmp_path / "manual" / "ibug" / "image_092 _01.pts"
    lines = pts.read_text().splitlines()
    del lines[5]
    pts.write_text("\n".join(lines).replace("n_points:  68", "n_points:  67") + "\n")
    with pytest.raises(
        common.DatasetFormatError, match=r"image_092 _01\.pts: 67 points, expected 68"
    ):
        _build("300w", tmp_path / "data", tmp_path / "manual")


def test_300w_bad_pts_line_names_file_and_line(tmp_path):
    w300_fixtures.write_fixture(str(tmp_path / "manual"))
    pts = tmp_path / "manual" / "afw" / "1051618982_1.pts"
    lines = pts.read_text().splitlines()
    lines[9] = "12.0 oops"
    pts.write_text("\n".join(lines) + "\n")
    with pytest.raises(common.DatasetFormatError, match=r"1051618982_1\.pts:10: expected 'x y'"):
        _build("300w", tmp_path / "data", tmp_path / "manual")


def test_300w_missing_image_or_folder_is_named(tmp_path):
    w300_fixtures.write_fixture(str(tmp_path / "manual"))
    os.remove(tmp_path / "manual" / "lfpw" / "testset" / "image_0001.png")
    with pytest.raises(common.DatasetFilesMissing, match=r"lfpw/testset/image_0001\.jpg or \.png"):
        _build("300w", tmp_path / "data", tmp_path / "manual")
    shutil.rmtree(tmp_path / "manual" / "ibug")
    with pytest.raises(common.DatasetFilesMissing) as err:
        _build("300w", tmp_path / "data", tmp_path / "manual")
    assert "ibug/ (no .pts files found)" in str(err.value)
    assert "https://ibug.doc.ic.ac.uk/resources/300-W/" in str(err.value)


def test_300w_corrupt_image_is_named(tmp_path):
    w300_fixtures.write_fixture(str(tmp_path / "manual"))
    (tmp_path / "manual" / "ibug" / "image_092 _01.jpg").write_bytes(b"garbage")
    with pytest.raises(common.DatasetFormatError, match=r"ibug/image_092 _01\.jpg: cannot decode"):
        _build("300w", tmp_path / "data", tmp_path / "manual")


@pytest.mark.slow
def test_300w_builds_300_images_fast(tmp_path):
    w300_fixtures.write_fixture(str(tmp_path / "manual"), faces_per_subset=50, size=256)
    start = time.perf_counter()
    b = _build("300w", tmp_path / "data", tmp_path / "manual")
    elapsed = time.perf_counter() - start
    assert b.info.splits["train"].num_examples == 150 and b.info.splits["full"].num_examples == 150
    assert elapsed < 60, elapsed


# ----------------------------------------------------------------------------- COFW


@pytest.fixture(scope="module")
def cofw_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cofw")
    fixture = cofw_fixtures.write_fixture(str(root / "manual"))
    _build("cofw", root / "data", root / "manual")
    return fixture, root / "data"


def test_cofw_splits_and_features(cofw_built):
    fixture, data_dir = cofw_built
    for split in ("train", "test"):
        got = _read_split("cofw", split, data_dir)
        want = fixture.split(split)
        assert len(got) == len(want)
        for ex in got:
            i = int(ex["file_name"].rsplit("[", 1)[1].rstrip("]"))
            assert ex["file_name"].startswith(cofw_builder.FILES[split][0])
            face = want[i]
            _check_geometry(ex, 29)
            # MATLAB 1-based -> 0-based, exactly.
            np.testing.assert_array_equal(ex["original_landmarks"], face.landmarks)
            np.testing.assert_array_equal(ex["occluded"], face.occluded)
            np.testing.assert_allclose(
                common.apply_affine(ex["to_original"], ex["box"].reshape(2, 2)),
                face.box.reshape(2, 2),
                atol=1e-3,
            )
            assert ex["image"].shape[-1] == 3
            original = (
                face.image if face.image.ndim == 3 else np.repeat(face.image[..., None], 3, -1)
            )
            _check_crop_pixels(ex, original)
            if face.image.ndim == 2:  # greyscale -> three equal channels
                spread = ex["image"].astype(int).max(-1) - ex["image"].astype(int).min(-1)
                assert spread.max() <= 6


def test_cofw_missing_file_and_bad_file(tmp_path):
    cofw_fixtures.write_fixture(str(tmp_path / "manual"))
    os.remove(tmp_path / "manual" / "COFW_test_color.mat")
    with pytest.raises(common.DatasetFilesMissing) as err:
        _build("cofw", tmp_path / "data", tmp_path / "manual")
    assert "Missing:\n  COFW_test_color.mat" in str(err.value)
    assert "https://data.caltech.edu/records/bc0bf-nc666" in str(err.value)
    (tmp_path / "manual" / "COFW_test_color.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(
        common.DatasetFormatError, match=r"COFW_test_color\.mat: not a readable MATLAB v7\.3"
    ):
        _build("cofw", tmp_path / "data", tmp_path / "manual")


def test_cofw_reads_matlab_layout(tmp_path):
    """The fixture really is MATLAB-shaped: transposed arrays, refs in '#refs#'."""
    import h5py

    fixture = cofw_fixtures.write_fixture(str(tmp_path))
    with h5py.File(tmp_path / "COFW_train_color.mat", "r") as f:
        assert f.userblock_size == 512
        assert f["phisTr"].shape == (87, 3) and f["IsTr"].attrs["MATLAB_class"] == b"cell"
        assert f[f["IsTr"][0, 1]].name.startswith("/#refs#/")
    with open(tmp_path / "COFW_train_color.mat", "rb") as fh:
        assert fh.read(10) == b"MATLAB 7.3"
    mat = cofw_builder.MatFile(str(tmp_path / "COFW_train_color.mat"), "IsTr", "phisTr", "bboxesTr")
    try:
        grey = fixture.faces["train"][1].image
        np.testing.assert_array_equal(mat.image(1), np.repeat(grey[..., None], 3, -1))
        np.testing.assert_array_equal(mat.image(0), fixture.faces["train"][0].image)
    finally:
        mat.close()


# ----------------------------------------------------------------------------- registry


def test_registry():
    assert set(data.DATASETS) == {"wflw", "300w", "cofw"}
    assert {k: s.num_landmarks for k, s in data.DATASETS.items()} == {
        "wflw": 98,
        "300w": 68,
        "cofw": 29,
    }
    assert data.get("the300w") is data.DATASETS["300w"]
    assert data.DATASETS["300w"].tfds_name == "the300w"
    assert set(data.DATASETS["wflw"].test_splits) == set(WFLW_SPLITS) - {"train"}
    assert tfds.builder_cls("cofw") is cofw_builder.Builder
    with pytest.raises(ValueError, match="Unknown dataset 'lfw'"):
        data.get("lfw")


def test_prepare_reuses_and_data_source_reads(tmp_path, cofw_built, capsys):
    _, data_dir = cofw_built
    b = data.prepare("cofw", str(data_dir), str(tmp_path / "not-needed"))
    assert b.info.file_format.value == "array_record"
    assert "using the prepared dataset" in capsys.readouterr().out
    source = data.data_source("cofw", "test", str(data_dir))
    assert len(source) == 2 and source[0]["image"].dtype == np.uint8
    with pytest.raises(FileNotFoundError, match="not prepared"):
        data.data_source("wflw", "test", str(tmp_path / "empty"))


def test_cli_reports_missing_files(tmp_path, capsys):
    argv = ["300w", "--data_dir", str(tmp_path / "data"), "--manual_dir", str(tmp_path / "none")]
    assert data.main(argv) == 1
    err = capsys.readouterr().err
    assert (
        "does not exist or is empty" in err
        and "helen/trainset/" in err
        and str(tmp_path / "none") in err
    )
