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
    assert "\n" not in str(e.value)
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
