"""validate.data: the CIFAR-10 python-archive loader (on archives generated here) and the
synthetic dataset."""

import gzip
import hashlib
import os
import tarfile

import numpy as np
import pytest
from cifar_archive import MEMBERS, write_archive

from validate import data


def make_batches(seed=0, sizes=(3, 4, 5, 2, 6, 7)):
    """Random batches in the CIFAR-10 layout: (n, 3072) uint8 rows and lists of int labels."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
               [int(v) for v in rng.integers(0, 10, size=n)])
        for name, n in zip(MEMBERS, sizes, strict=True)
    }


def expected_image(row):
    """Brute-force decoding of one 3072-byte row: pixel (c, r, s) is byte c·1024 + r·32 + s."""
    img = np.zeros((3, 32, 32), dtype=np.uint8)
    for c in range(3):
        for r in range(32):
            for s in range(32):
                img[c, r, s] = row[c * 1024 + r * 32 + s]
    return img


def check_equal(d, batches):
    train_rows = [row for name in MEMBERS[:5] for row in batches[name][0]]
    train_labels = [lab for name in MEMBERS[:5] for lab in batches[name][1]]
    assert d.train_images.shape == (len(train_rows), 3, 32, 32)
    assert d.train_images.dtype == np.uint8 and d.train_labels.dtype == np.int64
    for img, row in zip(d.train_images, train_rows, strict=True):
        np.testing.assert_array_equal(img, expected_image(row))
    assert d.train_labels.tolist() == train_labels
    for img, row in zip(d.test_images, batches["test_batch"][0], strict=True):
        np.testing.assert_array_equal(img, expected_image(row))
    assert d.test_labels.tolist() == batches["test_batch"][1]
    assert d.classes == data.CIFAR10_CLASSES


@pytest.fixture
def archive(tmp_path):
    batches = make_batches()
    root = tmp_path / "cifar"
    root.mkdir()
    md5 = write_archive(root / "cifar-10-python.tar.gz", batches)
    return root, md5, batches


def test_archive_round_trips_exactly(archive):
    root, md5, batches = archive
    check_equal(data.load_cifar10(root, md5=md5), batches)
    # the archive path itself, and upper-case md5, work too
    check_equal(data.load_cifar10(root / "cifar-10-python.tar.gz", md5=md5.upper()), batches)


def test_extracted_folder_round_trips_and_checks_members(archive, tmp_path):
    root, md5, batches = archive
    out = tmp_path / "extracted"
    with tarfile.open(root / "cifar-10-python.tar.gz") as tar:
        tar.extractall(out, filter="data")
    check_equal(data.load_cifar10(out, md5=md5), batches)  # custom md5: structure checks only
    check_equal(data.load_cifar10(out / "cifar-10-batches-py", md5=md5), batches)
    # with the official md5 the members are checked against the official per-file md5s
    with pytest.raises(data.DatasetError, match="data_batch_1: md5"):
        data.load_cifar10(out, md5=data.CIFAR10_MD5)
    os.remove(out / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(FileNotFoundError, match="lacks test_batch"):
        data.load_cifar10(out, md5=md5)


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_wrong_checksum_is_rejected_without_output(archive):
    root, md5, _ = archive
    before = _listing(root)
    with pytest.raises(data.DatasetError, match="does not match the expected") as e:
        data.load_cifar10(root, md5="0" * 32)
    assert "\n" not in str(e.value) and md5 in str(e.value)
    assert _listing(root) == before
    with pytest.raises(ValueError, match="32 hexadecimal"):
        data.load_cifar10(root, md5="abc")


def test_truncated_archive_is_rejected(archive):
    root, md5, _ = archive
    path = root / "cifar-10-python.tar.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    before = _listing(root)
    with pytest.raises(data.DatasetError, match="md5"):
        data.load_cifar10(root, md5=md5)
    # even when the checksum is (wrongly) that of the truncated file, reading fails cleanly
    trunc_md5 = hashlib.md5(raw[: len(raw) // 2]).hexdigest()
    with pytest.raises(data.DatasetError, match="not a readable") as e:
        data.load_cifar10(root, md5=trunc_md5)
    assert "\n" not in str(e.value) and "corrupt or truncated" in str(e.value)
    assert _listing(root) == before


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load_cifar10(tmp_path / "nowhere")
    msg = str(e.value)
    assert "\n" not in msg and "--download" in msg
    assert str(tmp_path / "nowhere" / "cifar-10-python.tar.gz") in msg
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("bad", ["shape", "dtype", "labels", "label_range"])
def test_malformed_members_are_rejected(tmp_path, bad):
    batches = make_batches()
    x, y = batches["data_batch_3"]
    if bad == "shape":
        x = x[:, :3000]
    elif bad == "dtype":
        x = x.astype(np.int16)
    elif bad == "labels":
        y = y[:-1]
    else:
        y = [10] * len(y)
    batches["data_batch_3"] = (x, y)
    md5 = write_archive(tmp_path / "cifar-10-python.tar.gz", batches)
    with pytest.raises(data.DatasetError, match="data_batch_3"):
        data.load_cifar10(tmp_path, md5=md5)


def test_download_is_atomic_and_checked(archive, tmp_path):
    root, md5, batches = archive
    url = (root / "cifar-10-python.tar.gz").as_uri()
    dest_dir = tmp_path / "dl"
    with pytest.raises(data.DatasetError, match="nothing was saved"):
        data.download_cifar10(dest_dir, url=url, md5="f" * 32, progress=False)
    assert _listing(dest_dir) == []  # no partial or temporary file left behind
    path = data.download_cifar10(dest_dir, url=url, md5=md5, progress=False)
    assert path.read_bytes() == (root / "cifar-10-python.tar.gz").read_bytes()
    assert _listing(dest_dir) == ["cifar-10-python.tar.gz"]
    check_equal(data.load_cifar10(dest_dir, md5=md5), batches)


def test_load_data_uses_md5_environment_variable(archive, monkeypatch):
    root, md5, batches = archive
    monkeypatch.setenv(data.MD5_ENV, md5)
    check_equal(data.load_data("cifar", data_dir=root), batches)
    monkeypatch.setenv(data.MD5_ENV, "1" * 32)
    with pytest.raises(data.DatasetError):
        data.load_data("cifar", data_dir=root)
    with pytest.raises(ValueError, match="data must be"):
        data.load_data("imagenet")


def test_synthetic_is_deterministic_balanced_and_learnable():
    a = data.synthetic_cifar10(1000, 500, seed=3)
    b = data.synthetic_cifar10(1000, 500, seed=3)
    c = data.synthetic_cifar10(1000, 500, seed=4)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.train_images, c.train_images)
    assert a.train_images.shape == (1000, 3, 32, 32) and a.train_images.dtype == np.uint8
    assert np.bincount(a.train_labels, minlength=10).tolist() == [100] * 10
    # learnable but not trivial: nearest class mean on raw pixels (colour only: the gratings
    # have random phases) beats chance (10 %) by far but is far from perfect
    x = a.train_images.reshape(1000, -1).astype(float)
    means = np.stack([x[a.train_labels == k].mean(0) for k in range(10)])
    t = a.test_images.reshape(500, -1).astype(float)
    pred = np.argmin(((t[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    acc = (pred == a.test_labels).mean()
    assert 0.3 < acc < 0.8
    with pytest.raises(ValueError, match="n_train"):
        data.synthetic_cifar10(0, 10)
    with pytest.raises(ValueError, match="noise"):
        data.synthetic_cifar10(10, 10, noise=float("nan"))
    with pytest.raises(ValueError, match="colour_jitter"):
        data.synthetic_cifar10(10, 10, colour_jitter=-1.0)


def test_unrelated_file_is_not_called_a_corrupt_archive(tmp_path):
    """--data-dir pointing at some other file: say it is not the archive; advise deleting and
    re-downloading only the file at DIR/cifar-10-python.tar.gz (where --download puts it)."""
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(data.DatasetError) as e:
        data.load_cifar10(text)
    msg = str(e.value)
    assert "is not a cifar-10-python.tar.gz archive" in msg and "folder" in msg
    assert "delete" not in msg and "\n" not in msg
    assert text.read_text().startswith("root:")  # untouched
    other = tmp_path / "other.tar.gz"  # gzip data, wrong checksum, another name
    with gzip.open(other, "wb") as f:
        f.write(b"not cifar")
    with pytest.raises(data.DatasetError, match="not the cifar-10-python.tar.gz archive") as e:
        data.load_cifar10(other)
    assert "delete" not in str(e.value)
    with pytest.raises(data.DatasetError, match="not a readable") as e:  # checksum skipped
        data.load_cifar10(other, md5=None)
    assert "delete" not in str(e.value)
    folder = tmp_path / "cifar"
    folder.mkdir()
    (folder / "cifar-10-python.tar.gz").write_bytes(other.read_bytes())
    with pytest.raises(data.DatasetError, match="delete it and use --download"):
        data.load_cifar10(folder)


# ---------------------------------------------------------------------------- digits and .npz
def test_digits_split_is_fixed_stratified_and_normalised():
    from sklearn.datasets import load_digits

    d = data.load_digits_data()
    raw = load_digits()
    assert d.train_images.shape == (1437, 1, 8, 8) and d.test_images.shape == (360, 1, 8, 8)
    assert d.train_images.dtype == np.float32 and d.num_classes == 10 and d.is_image
    # every image appears exactly once, in one split, with its label (brute-force match)
    both = np.concatenate([d.train_images, d.test_images])[:, 0]
    labels = np.concatenate([d.train_labels, d.test_labels])
    want = {(raw.images[i] / 16.0).astype(np.float32).tobytes(): raw.target[i]
            for i in range(len(raw.target))}
    got = {}
    for img, lab in zip(both, labels, strict=True):
        got.setdefault(img.tobytes(), set()).add(int(lab))
    assert len(both) == 1797 and all({want[k]} == v for k, v in got.items())
    # stratified: each class is 20% ± one image of the test set
    for k in range(10):
        n_k = int((raw.target == k).sum())
        assert abs(int((d.test_labels == k).sum()) - n_k * 360 / 1797) <= 1
    # the same split every time; statistics from the training split only
    again = data.load_digits_data()
    assert np.array_equal(again.test_labels, d.test_labels)
    assert d.mean[0] == pytest.approx(float(d.train_images.astype(np.float64).mean()), rel=1e-12)
    assert d.std[0] == pytest.approx(float(d.train_images.astype(np.float64).std()), rel=1e-12)
    assert data.data_identity(d) == data.data_identity(again)


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _good_arrays(rng, shape=(6, 5), dtype=np.uint8, k=3):
    def x(n):
        if dtype == np.uint8:
            return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        return rng.standard_normal((n, *shape)).astype(dtype)

    return {"x_train": x(12), "y_train": np.arange(12) % k, "x_test": x(5),
            "y_test": np.arange(5) % k}


@pytest.mark.parametrize(("shape", "dtype"), [((6, 5), np.uint8), ((2, 6, 5), np.float64),
                                              ((7,), np.float32)])
def test_npz_round_trip(tmp_path, shape, dtype):
    rng = np.random.default_rng(0)
    arrays = _good_arrays(rng, shape, dtype)
    path = _write_npz(tmp_path / "d.npz", **arrays, classes=np.array(["a", "b", "c"]))
    d = data.load_data(str(path))
    extra = (1,) if len(shape) == 2 else ()  # (N, H, W) gains a channel axis
    assert d.train_images.shape == (12, *extra, *shape)
    assert d.input_shape == (*extra, *shape) and d.classes == ("a", "b", "c")
    np.testing.assert_array_equal(d.train_images.reshape(arrays["x_train"].shape),
                                  arrays["x_train"].astype(d.train_images.dtype))
    np.testing.assert_array_equal(d.test_labels, arrays["y_test"])
    assert d.train_labels.dtype == np.int64
    assert d.train_images.dtype == (np.uint8 if dtype == np.uint8 else np.float32)
    # per-channel (images) or per-feature (vectors) statistics of the training split, by hand
    x = arrays["x_train"].astype(d.train_images.dtype).astype(np.float64)  # as stored
    x = x.reshape(d.train_images.shape) / (255.0 if dtype == np.uint8 else 1.0)
    for c in range(len(d.mean)):
        col = x[:, c]
        assert d.mean[c] == pytest.approx(col.mean(), rel=1e-9, abs=1e-12)
        assert d.std[c] == pytest.approx(col.std(), rel=1e-9)
    # without class names: K = 1 + the largest training label
    path2 = _write_npz(tmp_path / "e.npz", **arrays)
    assert data.load_npz(path2).classes == ("0", "1", "2")
    # identity: the data, not the path
    id1, id2 = data.data_identity(d), data.data_identity(data.load_npz(path2))
    assert id1["sha256"] == id2["sha256"] and id1["source"] != id2["source"]
    arrays["x_test"] = arrays["x_test"].copy()
    arrays["x_test"].flat[0] += 1
    path3 = _write_npz(tmp_path / "f.npz", **arrays)
    assert data.data_identity(data.load_npz(path3))["sha256"] != id1["sha256"]


def _bad(rng, case):
    a = _good_arrays(rng, (4, 4), np.float32)
    if case == "missing":
        del a["x_test"], a["y_test"]
    elif case == "lengths":
        a["y_train"] = a["y_train"][:-1]
    elif case == "label_range":
        a["y_test"] = a["y_test"] + 5
    elif case == "negative":
        a["y_train"] = a["y_train"] - 1
    elif case == "nan":
        a["x_train"][3, 1, 1] = np.nan
    elif case == "inf":
        a["x_test"][0, 0, 0] = np.inf
    elif case == "one_class":
        a["y_train"] = np.zeros(12, dtype=np.int64)
        a["y_test"] = np.zeros(5, dtype=np.int64)
    elif case == "float_labels":
        a["y_train"] = a["y_train"].astype(float)
    elif case == "int_pixels":
        a["x_train"] = a["x_train"].astype(np.int32)
    elif case == "shapes":
        a["x_test"] = np.zeros((5, 3, 3), dtype=np.float32)
    elif case == "ndim":
        a["x_train"] = np.zeros((12, 1, 1, 4, 4), dtype=np.float32)
    elif case == "empty":
        a["x_test"], a["y_test"] = np.zeros((0, 4, 4), np.float32), np.zeros(0, np.int64)
    elif case == "object":
        a["y_test"] = np.array([1, "a", None, 2, 3], dtype=object)
    elif case == "dtypes":
        a["x_test"] = (a["x_test"] * 0).astype(np.uint8)
    return a


BAD_NPZ = {
    "missing": "missing array(s) x_test, y_test",
    "lengths": "y_train has 11 labels but x_train has 12 examples",
    "label_range": "y_test has labels outside 0…2",
    "negative": "y_train has labels outside 0…1",
    "nan": "x_train has 1 non-finite values (NaN or inf)",
    "inf": "x_test has 1 non-finite values",
    "one_class": "y_train holds fewer than two classes",
    "float_labels": "y_train must be a 1-D array of integer labels",
    "int_pixels": "x_train must be uint8 or float, got int32",
    "shapes": "x_train examples are shaped (1, 4, 4) but x_test examples (1, 3, 3)",
    "ndim": "x_train must be shaped (N, H, W), (N, C, H, W) or (N, features)",
    "empty": "x_test holds no examples",
    "object": "y_test is an object array",
    "dtypes": "x_train is float32 but x_test is uint8",
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_malformed_npz_gives_one_clear_line(tmp_path, case):
    rng = np.random.default_rng(1)
    arrays = _bad(rng, case)
    path = tmp_path / "bad.npz"
    if case == "object":
        np.savez(path, **arrays)  # pickled inside; the loader refuses pickles
    else:
        _write_npz(path, **arrays)
    with pytest.raises(data.DatasetError) as e:
        data.load_data(str(path))
    msg = str(e.value)
    assert BAD_NPZ[case] in msg and "\n" not in msg and str(path) in msg


def test_not_an_npz_and_missing_file(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(data.DatasetError, match="not a readable .npz file"):
        data.load_npz(text)
    single = tmp_path / "one.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(data.DatasetError, match="single .npy array"):
        data.load_npz(single)
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load_data(str(tmp_path / "absent.npz"))
    with pytest.raises(ValueError, match="data must be one of digits, synthetic, cifar10"):
        data.load_data("mnist")


def test_synthetic_size():
    d = data.synthetic_cifar10(20, 10, seed=3, size=8)
    assert d.train_images.shape == (20, 3, 8, 8) and d.source == "synthetic(seed=3, size=8)"
    assert data.synthetic_cifar10(20, 10, seed=3).source == "synthetic(seed=3)"
