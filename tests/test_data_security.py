"""validate.data on hostile or damaged inputs: pickled code in CIFAR-10 members, corrupt gzip
streams, unsafe tar members, oversized members, a failed download, pickles in .npz files."""

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from cifar_archive import MEMBERS, member_dicts, py2_pickle, write_archive, write_members

from validate import data

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "cifar-10-batches-py"


class MkdirPayload:
    """Unpickling this object creates the directory ``marker`` (os.mkdir: no shell)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class SystemPayload:
    """Unpickling this object runs ``touch marker`` through os.system (the classic exploit)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


PAYLOADS = {"mkdir": (MkdirPayload, f"{os.mkdir.__module__}.mkdir"),
            "system": (SystemPayload, f"{os.system.__module__}.system")}


def make_batches(seed=0, sizes=(3, 4, 5, 2, 6, 7)):
    rng = np.random.default_rng(seed)
    return {name: (rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                   [int(v) for v in rng.integers(0, 10, size=n)])
            for name, n in zip(MEMBERS, sizes, strict=True)}


def assert_loaded(d, batches):
    """Every image and label as written (the image row → (3, 32, 32) reshape is checked
    element-wise against the index formula in tests/test_data.py; here: the raw bytes)."""
    train_rows = np.concatenate([batches[m][0] for m in MEMBERS[:5]])
    assert d.train_images.reshape(len(train_rows), -1).tobytes() == train_rows.tobytes()
    assert d.train_labels.tolist() == [v for m in MEMBERS[:5] for v in batches[m][1]]
    assert d.test_images.reshape(len(d.test_images), -1).tobytes() == \
        batches["test_batch"][0].tobytes()
    assert d.test_labels.tolist() == batches["test_batch"][1]
    assert d.classes == data.CIFAR10_CLASSES and d.train_labels.dtype == np.int64


def extract(archive, dest):
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / FOLDER


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------- pickled code in members
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("form", ["archive", "folder"])
def test_malicious_member_never_runs(tmp_path, payload, form):
    """A member whose pickle calls os.mkdir / os.system is refused before the call, with the
    member and the refused global named, whether the md5 check is skipped (md5=None) or passes
    (a user md5 matching the malicious archive, or matching member md5s of a folder)."""
    cls, refused = PAYLOADS[payload]
    marker = tmp_path / "MARKER"
    root = tmp_path / "cifar"
    root.mkdir()
    archive = root / data.CIFAR10_ARCHIVE
    md5 = write_archive(archive, make_batches(), extra={"data_batch_2": {b"x": cls(marker)}})
    if form == "archive":
        target, member_md5 = root, None
    else:
        target = extract(archive, tmp_path / "extracted")
        member_md5 = {m: data.file_md5(target / m) for m in data.CIFAR10_MEMBER_MD5}
    calls = [lambda: data.load_cifar10(target, md5=None),
             lambda: data.load_cifar10(target, md5=md5, member_md5=member_md5),
             lambda: data.load_data("cifar", data_dir=target, md5=md5)]
    for call in calls:
        with pytest.raises(data.DatasetError) as e:
            call()
        msg = one_line(e)
        assert "data_batch_2" in msg and refused in msg and "refused" in msg, msg
        assert not marker.exists()


def test_malicious_member_cli_exits_2_with_one_line(tmp_path):
    marker = tmp_path / "MARKER"
    root = tmp_path / "cifar"
    root.mkdir()
    md5 = write_archive(root / data.CIFAR10_ARCHIVE, make_batches(),
                        extra={"batches.meta": {b"x": SystemPayload(marker)}})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop(data.MD5_ENV, None)
    cmd = [sys.executable, "-m", "validate.cifar", "train", "--data", "cifar", "--data-dir",
           str(root), "--md5", md5, "--device", "cpu", "--preset", "quick",
           "--subset", "16", "--batch-size", "8", "--epochs", "1",
           "--out", str(tmp_path / "out"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "batches.meta" in lines[0] and "system" in lines[0], proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL, "py2"])
@pytest.mark.parametrize("form", ["archive", "folder"])
def test_legitimate_archives_still_load(tmp_path, protocol, form):
    """Arrays pickled by NumPy's own ndarray.__reduce__ (protocol 2 like the official files,
    the current default, protocol 5's out-of-line-capable form) and byte-for-byte Python 2
    pickles all load through the restricted unpickler."""
    batches = make_batches(seed=3)
    archive = tmp_path / data.CIFAR10_ARCHIVE
    md5 = write_archive(archive, batches, protocol=protocol)
    target = tmp_path if form == "archive" else extract(archive, tmp_path / "x")
    assert_loaded(data.load_cifar10(target, md5=md5), batches)
    assert_loaded(data.load_cifar10(target, md5=None), batches)


def test_numpy_labels_and_other_dtypes_load(tmp_path):
    """Labels as an int64 array or a list of NumPy scalars; a float32 extra entry."""
    batches = make_batches(seed=4)
    dicts = member_dicts(batches)
    dicts["data_batch_1"][b"labels"] = np.asarray(batches["data_batch_1"][1], dtype=np.int64)
    dicts["data_batch_2"][b"labels"] = [np.int32(v) for v in batches["data_batch_2"][1]]
    dicts["data_batch_3"][b"extra"] = np.linspace(0, 1, 7, dtype=np.float32).reshape(7, 1)
    dicts["data_batch_4"][b"data"] = np.asfortranarray(batches["data_batch_4"][0])
    for p in (2, 5):
        path = tmp_path / f"p{p}.tar.gz"
        write_members(path, {k: pickle.dumps(v, protocol=p) for k, v in dicts.items()})
        assert_loaded(data.load_cifar10(path, md5=None), batches)


def _forged(tmp_path, member, raw):
    """An otherwise valid archive whose ``member`` holds the pickle ``raw``."""
    raws = {k: pickle.dumps(v, protocol=2) for k, v in member_dicts(make_batches()).items()}
    raws[member] = raw
    path = tmp_path / "forged.tar.gz"
    write_members(path, raws)
    return path


@pytest.mark.parametrize(("case", "expect"), [
    ("object_array", "dtype"),
    ("forged_dtype_flags", "dtype"),
    ("structured_dtype", "dtype"),
    ("eval", "builtins.eval"),
    ("py2_builtin", "__builtin__.eval"),
    ("subclass", "numpy.ma.core._mareconstruct"),
    ("build_on_global", "setting attribute 'x'"),
    ("bad_array_state", "array data of 3 bytes"),
])
def test_refuses_what_cifar_does_not_need(tmp_path, case, expect):
    x = np.zeros((2, 3072), np.uint8)
    good = {b"data": x, b"labels": [0, 1]}
    if case == "object_array":
        raw = pickle.dumps({**good, b"labels": np.array([0, 1], dtype=object)}, protocol=2)
    elif case == "forged_dtype_flags":  # a uint8 dtype claiming to hold object pointers
        raw = py2_pickle(good, dtype_flags=0x29)
    elif case == "structured_dtype":
        raw = pickle.dumps({**good, b"s": np.zeros(2, dtype=[("a", "u1")])}, protocol=2)
    elif case == "eval":
        raw = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x00None\x85R."
    elif case == "py2_builtin":
        raw = b"\x80\x02c__builtin__\neval\nU\x04None\x85R."
    elif case == "build_on_global":  # BUILD (None, {'x': 1}) on numpy.dtype: alter the loader
        raw = b"\x80\x02cnumpy\ndtype\nN}X\x01\x00\x00\x00xK\x01s\x86b."
    elif case == "bad_array_state":  # raw bytes shorter than the shape says
        raw = py2_pickle(good).replace(b"T\x00\x18\x00\x00" + bytes(6144), b"U\x03abc", 1)
    else:
        raw = pickle.dumps({**good, b"m": np.ma.masked_array([1, 2])}, protocol=2)
    path = _forged(tmp_path, "test_batch", raw)
    with pytest.raises(data.DatasetError) as e:
        data.load_cifar10(path, md5=None)
    msg = one_line(e)
    assert "test_batch" in msg and expect in msg and "refused" in msg, msg


# ---------------------------------------------------------------- gzip integrity without md5
def test_flipped_bit_in_image_data_is_detected_without_md5(tmp_path):
    batches = make_batches(seed=5)
    path = tmp_path / data.CIFAR10_ARCHIVE
    write_archive(path, batches, protocol="py2")  # image bytes pickled raw, as in the originals
    clean = gzip.decompress(path.read_bytes())  # the tar stream
    # recompressed at level 0 (still valid gzip, 10-byte header): deflate stores the bytes
    # verbatim, so an image row's bytes appear in the file and flipping one changes one pixel
    raw = bytearray(gzip.compress(clean, compresslevel=0))
    pos = raw.find(batches["data_batch_3"][0][1, 100:164].tobytes())
    assert pos > 0
    raw[pos + 5] ^= 0x10
    path.write_bytes(bytes(raw))
    # inflated without the trailer check: same length, one byte changed, so only the CRC tells
    inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(raw[10:]))
    assert len(inflated) == len(clean)
    assert sum(a != b for a, b in zip(inflated, clean, strict=True)) == 1
    with pytest.raises(data.DatasetError) as e:
        data.load_cifar10(path, md5=None)
    msg = one_line(e)
    assert str(path) in msg and "corrupt" in msg and "CRC check failed" in msg, msg


@pytest.mark.parametrize("cut", [1, 4, 8])
def test_truncated_gzip_trailer_is_detected_without_md5(tmp_path, cut):
    path = tmp_path / data.CIFAR10_ARCHIVE
    write_archive(path, make_batches(seed=6))
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(data.DatasetError) as e:
        data.load_cifar10(path, md5=None)
    msg = one_line(e)
    assert str(path) in msg and "corrupt" in msg, msg


# ------------------------------------------------------------------- unsafe and huge members
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink_out", "hardlink_out",
                                  "device"])
def test_unsafe_tar_members_are_refused(tmp_path, kind):
    """An archive with a member that would land outside its folder when extracted (``..``,
    an absolute path, a link pointing out) or a device node is not CIFAR-10: refused, and
    nothing is written anywhere."""
    raws = {k: pickle.dumps(v, protocol=2) for k, v in member_dicts(make_batches()).items()}
    info = tarfile.TarInfo({"dotdot": "cifar-10-batches-py/../../evil",
                            "absolute": str(tmp_path / "evil")}.get(kind, "cifar-10-batches-py/x"))
    body = b"pwned"
    if kind == "symlink_out":
        info.type, info.linkname, body = tarfile.SYMTYPE, "/etc/passwd", None
    elif kind == "hardlink_out":
        info.type, info.linkname, body = tarfile.LNKTYPE, "../../etc/passwd", None
    elif kind == "device":
        info.type, info.devmajor, info.devminor, body = tarfile.CHRTYPE, 1, 3, None
    info.size = len(body) if body else 0
    raws = {"evil": (info, body), **raws}  # first, so that the valid members follow it
    root = tmp_path / "dl"
    root.mkdir()
    path = root / data.CIFAR10_ARCHIVE
    md5 = write_members(path, raws)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for md5_arg in (None, md5):
        with pytest.raises(data.DatasetError) as e:
            data.load_cifar10(root, md5=md5_arg)
        msg = one_line(e)
        assert info.name in msg and "unsafe" in msg, msg
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_oversized_members_are_refused_before_reading(tmp_path, monkeypatch):
    batches = make_batches()
    path = tmp_path / data.CIFAR10_ARCHIVE
    write_archive(path, batches)
    size = max(len(pickle.dumps(d, protocol=2)) for d in member_dicts(batches).values())
    biggest = max(member_dicts(batches), key=lambda m: len(pickle.dumps(
        member_dicts(batches)[m], protocol=2)))
    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", size - 1)
    with pytest.raises(data.DatasetError, match=rf"{biggest} is larger than") as e:
        data.load_cifar10(path, md5=None)
    one_line(e)
    folder = extract(path, tmp_path / "x")
    with pytest.raises(data.DatasetError, match=rf"{biggest}: larger than"):
        data.load_cifar10(folder, md5=None)
    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", size)
    assert_loaded(data.load_cifar10(path, md5=None), batches)


# --------------------------------------------------------------------------- failed download
def test_download_without_network_is_one_clear_line(tmp_path, monkeypatch):
    def refuse(url, *a, **k):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    root = tmp_path / "data"
    for call in (lambda: data.download_cifar10(root, progress=False),
                 lambda: data.load_data("cifar", data_dir=root, download=True)):
        with pytest.raises(data.DatasetError) as e:
            call()
        msg = one_line(e)
        assert data.CIFAR10_URL in msg and str(root / data.CIFAR10_ARCHIVE) in msg, msg
        assert "Network is unreachable" in msg and "place" in msg, msg
    assert sorted(os.listdir(root)) == []  # no temporary file left behind


def test_download_url_environment_variable(tmp_path, monkeypatch):
    """$SGDTHEORY_CIFAR10_URL (a mirror) is fetched instead of the official URL."""
    batches = make_batches(seed=8)
    src = tmp_path / "mirror.tar.gz"
    md5 = write_archive(src, batches)
    monkeypatch.setenv(data.URL_ENV, src.as_uri())
    root = tmp_path / "data"
    assert_loaded(data.load_data("cifar", data_dir=root, md5=md5, download=True), batches)
    assert hashlib.md5((root / data.CIFAR10_ARCHIVE).read_bytes()).hexdigest() == md5


def test_download_failure_cli_exits_2_with_one_line(tmp_path):
    url = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # the discard port: nothing listens
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", data.URL_ENV: url,
                "no_proxy": "*",
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    root = tmp_path / "data"
    cmd = [sys.executable, "-m", "validate.cifar", "train", "--data", "cifar", "--data-dir",
           str(root), "--download", "--device", "cpu", "--preset", "quick",
           "--out", str(tmp_path / "out"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and str(root) in lines[0], proc.stderr
    assert not (root / data.CIFAR10_ARCHIVE).exists()


# ------------------------------------------------------------------------------- .npz files
def test_npz_with_pickled_payload_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((6, 4, 4)), "y_train": np.arange(6) % 2,
              "x_test": rng.random((3, 4, 4)),
              "y_test": np.array([MkdirPayload(marker), 0, 1], dtype=object)}
    path = tmp_path / "evil.npz"
    np.savez(path, **arrays)
    with pytest.raises(data.DatasetError, match="y_test is an object array"):
        data.load_data(str(path))
    single = tmp_path / "evil.npy"  # a lone .npy holding a pickle, passed as the data
    np.save(single, arrays["y_test"], allow_pickle=True)
    with pytest.raises(data.DatasetError, match="not a readable .npz"):
        data.load_data(str(single))
    assert not marker.exists()
    buf = io.BytesIO()
    pickle.dump(MkdirPayload(marker), buf)
    raw_pickle = tmp_path / "evil.pkl.npz"
    raw_pickle.write_bytes(buf.getvalue())
    with pytest.raises(data.DatasetError, match="not a readable .npz"):
        data.load_data(str(raw_pickle))
    assert not marker.exists()
