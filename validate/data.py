r"""The data sets of ``validate``: CIFAR-10 from its python archive, scikit-learn's digits, a
user's ``.npz`` file, and a learnable synthetic stand-in — all as one in-memory
:class:`ImageData`.

**CIFAR-10.** The archive is ``cifar-10-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html (md5 ``c58f30108f718f92721af3b95e74349a``). It holds
``cifar-10-batches-py/`` with ``data_batch_1`` … ``data_batch_5`` (training, 10 000 images each),
``test_batch`` and ``batches.meta``. Each batch is a pickled dict with ``b'data'`` (n × 3072 uint8:
the red, green and blue 32×32 planes one after another, row-major) and ``b'labels'`` (n ints in
0…9); ``batches.meta`` has ``b'label_names'``. The members are Python 2 pickles, read with
``encoding='bytes'`` by a restricted unpickler that builds only dicts, lists, tuples, bytes, str,
numbers and plain numeric NumPy arrays (NumPy's pickled form, checked and rebuilt with
``numpy.frombuffer``) and refuses any other global — ``os.system`` and the like — before it is
imported or called, with a :class:`DatasetError` naming the member and the global. So a hostile
or tampered member is refused whether or not an md5 was checked.

:func:`load_cifar10` reads the archive directly (no extraction) after checking its md5, or an
already extracted ``cifar-10-batches-py`` folder after checking its structure (and, for the
official data, the md5 of every member). The expected archive md5 is an argument (``md5=``) so
that mirrors and the small archives the tests generate can be verified; the CLI exposes it as
``--md5`` or the environment variable ``SGDTHEORY_CIFAR10_MD5``. The archive is read in one pass
to the end of its gzip stream, so gzip verifies its CRC-32 and length even with ``md5=None`` (a
flipped bit or a cut-off trailer is a :class:`DatasetError`); a member with an absolute path,
``..``, a link pointing outside or a device node, or larger than :data:`MAX_MEMBER_BYTES`,
rejects the archive. :func:`download_cifar10` fetches the archive with an atomic write
(temporary file, checksum, ``os.replace``) from :data:`CIFAR10_URL` or, when set, the URL in
the environment variable ``SGDTHEORY_CIFAR10_URL`` (a mirror; ``file://`` works); a failed
download is one line saying which URL, where the file would have gone and how to place it by
hand. Images come back as ``(n, 3, 32, 32)`` uint8 arrays (channels first, RGB) and labels as
``(n,)`` int64 arrays.

**Digits** (:func:`load_digits_data`): scikit-learn's bundled 1,797 8×8 handwritten digits
(no download), pixel values 0…16 scaled to [0, 1], shaped (n, 1, 8, 8). A fixed stratified split
(``sklearn.model_selection.train_test_split(test_size=360, stratify=labels, random_state=0)``)
gives 1,437 training and 360 test images; the split never depends on a run's seed, so every run
is scored on the same test set.

**A user's .npz** (:func:`load_npz`): arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``
(and optionally ``classes``, the K class names); ``x`` uint8 (scaled by 1/255) or float, shaped
(N, H, W) (one channel), (N, C, H, W) or (N, features); ``y`` integer labels 0…K−1 (K =
``len(classes)`` when given, else 1 + the largest training label). Every malformed file —
missing keys, mismatched lengths or shapes, labels out of range, NaN or infinite pixels, fewer
than two classes, object arrays, not an .npz at all — is a :class:`DatasetError` whose message
is one line naming the array and the problem.

**Synthetic** (:func:`synthetic_cifar10`): a learnable data set of CIFAR-10's shape (or smaller
square images), class-dependent colour and grating texture plus noise, deterministic from a
seed, for tests and machines without CIFAR-10.

**Normalisation.** :class:`ImageData` carries the per-channel ``mean`` and ``std`` that the
training code subtracts and divides by (after scaling uint8 by 1/255): CIFAR-10's published
training statistics for CIFAR-10 and the synthetic set, the training split's own statistics for
digits and ``.npz`` files (per channel for images, per feature for vectors).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_MEMBER_MD5",
    "CIFAR10_URL",
    "DatasetError",
    "ImageData",
    "download_cifar10",
    "file_md5",
    "find_cifar10",
    "load_cifar10",
    "data_identity",
    "load_data",
    "load_digits_data",
    "load_npz",
    "synthetic_cifar10",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
#: md5 of each member of the official archive (the values torchvision checks).
CIFAR10_MEMBER_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
TRAIN_MEMBERS = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_MEMBER = "test_batch"
META_MEMBER = "batches.meta"
MD5_ENV = "SGDTHEORY_CIFAR10_MD5"
URL_ENV = "SGDTHEORY_CIFAR10_URL"
DATA_DIR_ENV = "SGDTHEORY_DATA"
#: Largest member read (bytes): the official batches are 31 MB; a member claiming more is refused
#: before it is decompressed into memory.
MAX_MEMBER_BYTES = 256 << 20


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean of the training images (RGB, [0, 1])
CIFAR10_STD = (0.2470, 0.2435, 0.2616)   # per-channel std


class DatasetError(ValueError):
    """The dataset files exist but are corrupt, truncated or not in the expected format."""


@dataclass(frozen=True)
class ImageData:
    """A classification data set held in memory (images, or feature vectors).

    Attributes:
      train_images: (n_train, C, H, W) images or (n_train, features) vectors; uint8 (scaled by
        1/255 before normalisation) or float32.
      train_labels: (n_train,) int64 in 0 … len(classes) − 1.
      test_images, test_labels: the same for the test split.
      classes: class names.
      source: where it came from (a path, ``digits``, or ``synthetic(seed=…)``).
      mean, std: per-channel (images) or per-feature (vectors) statistics subtracted and divided
        by after the 1/255 scaling of uint8 data; default CIFAR-10's.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example: (C, H, W) or (features,)."""
        return tuple(int(v) for v in self.train_images.shape[1:])

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3


def data_identity(data: ImageData) -> dict:
    """What identifies a data set in a run's settings and outputs: source, sizes, shapes, dtype,
    number of classes, and a SHA-256 (16 hex digits) of the four arrays' bytes and shapes, so
    that the same data under another path keeps its identity and changed data does not."""
    h = hashlib.sha256()
    for a in (data.train_images, data.train_labels, data.test_images, data.test_labels):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1).data if a.size else b"")
    return {
        "source": data.source,
        "sha256": h.hexdigest()[:16],
        "train_examples": int(data.train_images.shape[0]),
        "test_examples": int(data.test_images.shape[0]),
        "input_shape": list(data.input_shape),
        "dtype": str(data.train_images.dtype),
        "classes": int(data.num_classes),
    }


def default_data_dir() -> Path:
    """``$SGDTHEORY_DATA`` if set, else ``~/.cache/sgdtheory/cifar10``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "sgdtheory" / "cifar10"


def default_md5() -> str:
    """The archive md5 to expect: ``$SGDTHEORY_CIFAR10_MD5`` if set (mirrors, tests), else the
    official one."""
    return os.environ.get(MD5_ENV) or CIFAR10_MD5


def default_url() -> str:
    """Where ``--download`` fetches the archive: ``$SGDTHEORY_CIFAR10_URL`` if set (a mirror,
    including a ``file://`` URL), else the official :data:`CIFAR10_URL`."""
    return os.environ.get(URL_ENV) or CIFAR10_URL


def file_md5(path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks of ``chunk`` bytes."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_md5_string(md5):
    if md5 is None:
        return None
    md5 = str(md5).strip().lower()
    if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
        raise ValueError(f"md5 must be 32 hexadecimal digits, got {md5!r}")
    return md5


def find_cifar10(data_dir) -> Path:
    """Locate CIFAR-10 under ``data_dir``.

    Looks, in order, for ``data_dir`` itself being the archive, ``data_dir/cifar-10-python.tar.gz``,
    ``data_dir/cifar-10-batches-py/`` and ``data_dir`` itself being the extracted folder.
    Raises ``FileNotFoundError`` with a one-line message saying where it looked and how to get it.
    """
    root = Path(data_dir).expanduser()
    if root.is_file():
        return root
    candidates = [root / CIFAR10_ARCHIVE, root / CIFAR10_FOLDER, root]
    for c in candidates[:2]:
        if c.exists():
            return c
    if (root / TRAIN_MEMBERS[0]).exists():
        return root
    raise FileNotFoundError(
        f"CIFAR-10 not found: looked for {candidates[0]} and {candidates[1]}/; pass --download to "
        f"fetch it from {CIFAR10_URL} (163 MB), point --data-dir at a folder holding it, "
        "or use --data synthetic"
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class _Refused(Exception):
    """Something in a member's pickle that the CIFAR-10 format never holds (message: what)."""


_NUMERIC_DTYPES = frozenset(("b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8",
                             "f2", "f4", "f8"))
_NDARRAY = object()  # what the global numpy.ndarray resolves to: a marker, never the class


def _text(v) -> str | None:
    """A pickled Python 2 ``str`` arrives as bytes under ``encoding='bytes'``."""
    if isinstance(v, bytes):
        try:
            return v.decode("ascii")
        except UnicodeDecodeError:
            return None
    return v if isinstance(v, str) else None


def _shape(v) -> tuple[int, ...]:
    if not isinstance(v, tuple) or not all(type(n) is int and n >= 0 for n in v):
        raise _Refused(f"array shape {v!r:.60}")
    return v


class _Dtype:
    """Stand-in for ``numpy.dtype(spec, align, copy)`` in a pickle: only plain numeric dtypes,
    and only their standard state. NumPy's own ``dtype.__setstate__`` accepts forged flags (a
    uint8 dtype claiming to hold object pointers), so the state is checked here instead."""

    __slots__ = ("dtype",)

    def __init__(self, spec, align=False, copy=False):
        text = _text(spec)
        if text not in _NUMERIC_DTYPES:
            raise _Refused(f"dtype {spec!r:.60} (only numeric dtypes: "
                           f"{', '.join(sorted(_NUMERIC_DTYPES))})")
        self.dtype = np.dtype(text)

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) != 8 \
                or state[0] != 3:
            raise _Refused(f"dtype state {state!r:.80}")
        order = _text(state[1])
        if order not in ("<", ">", "|", "=") or state[2:5] != (None, None, None) \
                or state[5:7] != (-1, -1) or state[7] != self.dtype.flags:
            raise _Refused(f"dtype state {state!r:.80} for {self.dtype} (only a plain numeric "
                           f"dtype's: byte order, no fields, flags {self.dtype.flags})")
        if order in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(order)


def _as_dtype(v) -> np.dtype:
    if not isinstance(v, _Dtype):
        raise _Refused(f"array dtype {type(v).__name__}")
    return v.dtype


def _from_bytes(raw, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    if not isinstance(raw, (bytes, bytearray)):
        raise _Refused(f"array data of type {type(raw).__name__} (only raw bytes)")
    count = 1
    for n in shape:
        count *= n
    if len(raw) != count * dtype.itemsize:
        raise _Refused(f"array data of {len(raw)} bytes for shape {shape} {dtype}")
    if count == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order=order)


class _Array:
    """Stand-in for an ndarray being unpickled: ``_reconstruct(ndarray, (0,), b'b')`` makes
    one, BUILD fills it once from (version, shape, dtype, is_fortran, raw bytes)."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if self.array is not None or not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused(f"array state {state!r:.80}")
        if len(state) == 5:
            if state[0] != 1:
                raise _Refused(f"array state version {state[0]!r:.20}")
            state = state[1:]
        shape, dtype, fortran, raw = state
        if type(fortran) not in (bool, int):
            raise _Refused(f"array order {fortran!r:.20}")
        self.array = _from_bytes(raw, _as_dtype(dtype), _shape(shape), "F" if fortran else "C")


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY:
        raise _Refused(f"_reconstruct of {type(cls).__name__}")
    return _Array()


def _frombuffer(buf, dtype, shape, order):
    arr = _Array()
    order = _text(order)
    if order not in ("C", "F"):
        raise _Refused(f"array order {order!r:.20}")
    arr.array = _from_bytes(buf, _as_dtype(dtype), _shape(shape), order)
    return arr


def _scalar(dtype, raw=None):
    """A NumPy scalar (e.g. a label as numpy.int64) → the equal Python number."""
    return _from_bytes(raw, _as_dtype(dtype), (), "C").item()


def _latin1(text, encoding="latin1"):
    """How Python 3 writes ``bytes`` at pickle protocol 2: ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with {encoding!r:.20}")
    return text.encode("latin-1")


class _Global:
    """What an allowed global resolves to: a call-only wrapper without attributes to set, so
    that a pickle's BUILD opcode cannot alter the stand-ins for later loads."""

    __slots__ = ("_fn",)

    def __init__(self, fn):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args):
        return self._fn(*args)

    def __setattr__(self, name, value):
        raise _Refused(f"setting attribute {name!r:.40} of a global")


_ALLOWED_GLOBALS = {
    **{(m, "_reconstruct"): _Global(_reconstruct)
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _Global(_scalar)
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _Global(_frombuffer)
       for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Global(_Dtype),
    ("_codecs", "encode"): _Global(_latin1),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 member holds — dicts, lists, tuples, bytes, str, numbers and
    plain numeric NumPy arrays (as pickled by Python 2's cPickle or by NumPy's
    ``ndarray.__reduce__`` at protocols 2…5) — and refuses every other global before it is
    imported or called. The NumPy globals resolve to local stand-ins that check the pickled
    state and build the arrays with ``numpy.frombuffer``; nothing of NumPy's own unpickling
    runs. (Only memory bounded by the member's size is allocated.)"""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"global {module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused("persistent id")


def _resolve(obj):
    """Replace the stand-ins in the unpickled dicts and lists by real arrays and dtypes."""
    def real(v):
        if isinstance(v, _Array):
            if v.array is None:
                raise _Refused("array without its data")
            return v.array
        if isinstance(v, _Dtype):
            return v.dtype
        return v

    obj = real(obj)
    seen, stack = set(), [obj] if isinstance(obj, (dict, list)) else []
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        items = c.items() if isinstance(c, dict) else enumerate(c)
        for k, v in list(items):
            c[k] = v = real(v)
            if isinstance(v, (dict, list)):
                stack.append(v)
    return obj


def _unpickle(raw: bytes, where: str):
    """Unpickle one member with :class:`_CifarUnpickler`; a refused global or state, or any
    unreadable pickle, is a one-line DatasetError naming ``where`` (the member)."""
    try:
        return _resolve(_CifarUnpickler(io.BytesIO(raw), encoding="bytes").load())
    except _Refused as e:
        raise DatasetError(f"{where}: refused to unpickle {e}: a CIFAR-10 member holds only "
                           "dicts, lists, bytes, numbers and numeric NumPy arrays, so this file "
                           "is not CIFAR-10 (or was tampered with); nothing in it was run") \
            from None
    except Exception as e:  # noqa: BLE001 - truncated or garbage pickle: many exception types
        raise DatasetError(f"{where}: not a readable pickle ({type(e).__name__}: "
                           f"{_one_line(e)[:200]})") from None


def _parse_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one batch file and check its format; returns (images (n,3,32,32), labels (n,)).
    ``where`` names the member in messages."""
    d = _unpickle(raw, where)
    name = where
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise DatasetError(f"{name}: expected a dict with keys b'data' and b'labels'")
    data, labels = d[b"data"], d[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DatasetError(f"{name}: b'data' must be an (n, 3072) uint8 array, got {shape} {dtype}")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{name}: b'labels' must be {data.shape[0]} integers, "
                           f"got shape {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise DatasetError(f"{name}: labels outside 0..9")
    if data.shape[0] == 0:
        raise DatasetError(f"{name}: holds no images")
    return data.reshape(-1, 3, 32, 32).copy(), labels.astype(np.int64)


def _parse_meta(raw: bytes, where: str) -> tuple[str, ...]:
    d = _unpickle(raw, where)
    try:
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in d[b"label_names"])
    except Exception as e:  # noqa: BLE001 - not a dict, no key, not a sequence, not text
        raise DatasetError(f"{where}: no readable b'label_names' ({type(e).__name__})") \
            from None
    if len(names) != len(CIFAR10_CLASSES):
        raise DatasetError(f"{where}: expected 10 label names, got {len(names)}")
    return names


def _parse_member(member: str, raw: bytes, where: str):
    return _parse_meta(raw, where) if member == META_MEMBER else _parse_batch(raw, where)


def _assemble(parsed: dict, source: str) -> ImageData:
    """Build ImageData from the parsed members (member name → _parse_member's result)."""
    train = [parsed[m] for m in TRAIN_MEMBERS]
    test_x, test_y = parsed[TEST_MEMBER]
    return ImageData(
        train_images=np.concatenate([x for x, _ in train]),
        train_labels=np.concatenate([y for _, y in train]),
        test_images=test_x,
        test_labels=test_y,
        classes=parsed[META_MEMBER],
        source=source,
    )


def _archive_advice(path: Path) -> str:
    """What to do about a bad archive: re-download only where --download would put it (never
    advise deleting a file the user pointed at under another name)."""
    if path.name == CIFAR10_ARCHIVE:
        return "delete it and use --download"
    return (f"is --data-dir meant to be a folder holding {CIFAR10_ARCHIVE} or "
            f"{CIFAR10_FOLDER}/, or that archive itself?")


def _check_is_archive(path: Path) -> None:
    """Reject, with a one-line message, a file that is not gzip data at all (e.g. --data-dir
    pointing at some unrelated file) before checksumming or unpickling anything."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    if magic != b"\x1f\x8b":
        raise DatasetError(f"{path} is not a {CIFAR10_ARCHIVE} archive (not gzip data) nor a "
                           f"CIFAR-10 folder; point --data-dir at a folder holding "
                           f"{CIFAR10_ARCHIVE} or {CIFAR10_FOLDER}/, or at the archive itself")


def _unsafe_member(info: tarfile.TarInfo) -> str | None:
    """Why a tar member could not be part of CIFAR-10 (would land outside its folder when
    extracted, or is a device or FIFO), or None."""
    def escapes(name: str) -> bool:
        p = PurePosixPath(name.replace("\\", "/"))
        return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")

    if escapes(info.name):
        return "an absolute path or one with '..'"
    if (info.issym() or info.islnk()) and escapes(info.linkname):
        return f"a link to {info.linkname!r} (outside the archive's folder)"
    if info.ischr() or info.isblk() or info.isfifo():
        return "a device or FIFO"
    return None


def _read_archive(path: Path) -> ImageData:
    """Read the members from the archive in one pass (never extracted), then read the gzip
    stream to its end so that gzip checks every stream's CRC-32 and length, md5 or not."""
    wanted = {f"{CIFAR10_FOLDER}/{m}": m for m in (*TRAIN_MEMBERS, TEST_MEMBER, META_MEMBER)}
    parsed, errors = {}, {}
    try:
        with gzip.open(path, "rb") as gz:
            with tarfile.open(fileobj=gz, mode="r|") as tar:
                for info in tar:
                    why = _unsafe_member(info)
                    if why is not None:
                        raise DatasetError(f"{path}: member {info.name!r} is unsafe ({why}); "
                                           f"not a {CIFAR10_ARCHIVE} archive, refusing to read "
                                           "it (and do not extract it)")
                    member = wanted.get(info.name)
                    if member is None:
                        continue
                    if not info.isreg():
                        raise DatasetError(f"{path}: member {info.name} is not a regular file")
                    if info.size > MAX_MEMBER_BYTES:
                        raise DatasetError(f"{path}: member {info.name} is larger than "
                                           f"{MAX_MEMBER_BYTES} bytes ({info.size}); not "
                                           "CIFAR-10 (its batches are 31 MB)")
                    raw = tar.extractfile(info).read()
                    try:  # a format error is reported after the integrity check below
                        parsed[member] = _parse_member(member, raw, f"{path}: {info.name}")
                        errors.pop(member, None)
                    except DatasetError as e:
                        errors[member] = e
                        parsed.pop(member, None)
                    del raw
            while gz.read(1 << 20):  # to the end: gzip verifies each CRC-32 and length
                pass
    except DatasetError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DatasetError(f"{path}: not a readable {CIFAR10_ARCHIVE} archive, corrupt or "
                           f"truncated ({type(e).__name__}: {_one_line(e)}); "
                           f"{_archive_advice(path)}") from None
    for member in (*TRAIN_MEMBERS, TEST_MEMBER, META_MEMBER):
        if member in errors:
            raise errors[member]
        if member not in parsed:
            raise DatasetError(f"{path}: member {CIFAR10_FOLDER}/{member} is missing")
    return _assemble(parsed, str(path))


def _read_folder(path: Path, member_md5: dict[str, str] | None) -> ImageData:
    files = {}
    for member in (*TRAIN_MEMBERS, TEST_MEMBER, META_MEMBER):
        f = path / member
        if not f.is_file():
            raise FileNotFoundError(f"CIFAR-10 folder {path} lacks {member}; re-extract "
                                    f"{CIFAR10_ARCHIVE} or pass --download")
        files[member] = f
    parsed = {}
    for member, f in files.items():
        size = f.stat().st_size
        if size > MAX_MEMBER_BYTES:
            raise DatasetError(f"{f}: larger than {MAX_MEMBER_BYTES} bytes ({size}); not "
                               "CIFAR-10 (its batches are 31 MB)")
        raw = f.read_bytes()  # read once: the bytes checked are the bytes parsed
        if member_md5 is not None:
            got = hashlib.md5(raw).hexdigest()
            if got != member_md5[member]:
                raise DatasetError(f"{f}: md5 {got} does not match the expected "
                                   f"{member_md5[member]}; the file is corrupt or not CIFAR-10")
        parsed[member] = _parse_member(member, raw, str(f))
    return _assemble(parsed, str(path))


def load_cifar10(data_dir, *, md5: str | None = CIFAR10_MD5,
                 member_md5: dict[str, str] | None = None) -> ImageData:
    """Load CIFAR-10 (train 50 000, test 10 000 images for the official archive).

    Args:
      data_dir: a folder holding ``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``, or the
        archive or extracted folder itself.
      md5: expected md5 of the archive (hex). ``None`` skips the check (not recommended). An
        archive whose md5 differs is rejected before anything is unpickled.
      member_md5: expected md5 of each member of an extracted folder. Default: the official
        values when ``md5`` is the official archive md5, otherwise none (structure, shapes and
        dtypes are always checked).

    Returns:
      :class:`ImageData` with (n, 3, 32, 32) uint8 images and int64 labels.

    Raises:
      FileNotFoundError: nothing found (the message says where it looked and how to get it).
      DatasetError: wrong checksum, truncated or malformed files.
    """
    md5 = _check_md5_string(md5)
    path = find_cifar10(data_dir)
    if path.is_file():
        _check_is_archive(path)
        if md5 is not None:
            got = file_md5(path)
            if got != md5:
                what = ("the file is corrupt or incomplete" if path.name == CIFAR10_ARCHIVE
                        else f"it is not the {CIFAR10_ARCHIVE} archive, or is corrupt")
                raise DatasetError(
                    f"{path}: md5 {got} does not match the expected {md5}; {what} "
                    f"({_archive_advice(path)}), or pass --md5 / ${MD5_ENV} for a mirror"
                )
        return _read_archive(path)
    if member_md5 is None and md5 == CIFAR10_MD5:
        member_md5 = CIFAR10_MEMBER_MD5
    return _read_folder(path, member_md5)


def download_cifar10(data_dir, *, url: str | None = None, md5: str | None = CIFAR10_MD5,
                     progress: bool = True) -> Path:
    """Fetch the archive into ``data_dir/cifar-10-python.tar.gz`` unless a verified copy is there.

    ``url`` defaults to :func:`default_url` (``$SGDTHEORY_CIFAR10_URL`` or the official one).
    The bytes go to a temporary file in the same folder, the md5 is checked, and only then is the
    file moved into place with ``os.replace`` (atomic), so an interrupted or corrupt download never
    leaves a file under the final name. Returns the archive path.

    Raises:
      DatasetError: the download failed (no network, refused, HTTP error, cut short: one line
        with the URL, the destination, the reason and how to place the file by hand) or the
        downloaded bytes have the wrong md5.
    """
    md5 = _check_md5_string(md5)
    url = default_url() if url is None else str(url)
    root = Path(data_dir).expanduser()
    dest = root / CIFAR10_ARCHIVE
    if dest.is_file() and (md5 is None or file_md5(dest) == md5):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cifar10-", suffix=".part", dir=root)
    try:
        h, got = hashlib.md5(), 0
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                from tqdm.auto import tqdm

                with tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10",
                          disable=not progress) as bar:
                    while block := resp.read(1 << 20):
                        out.write(block)
                        h.update(block)
                        got += len(block)
                        bar.update(len(block))
                if total is not None and got != total:  # connection closed early
                    raise http.client.IncompleteRead(b"", total - got)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) if isinstance(e, urllib.error.URLError) \
                and not isinstance(e, urllib.error.HTTPError) else e
            raise DatasetError(
                f"download of {url} into {dest} failed ({type(e).__name__}: "
                f"{_one_line(reason if reason is not None else e)}); nothing was saved. Without "
                f"network access, fetch that file elsewhere and place it at {dest} (md5 "
                f"{md5 or 'unchecked'}), or set ${URL_ENV} to a mirror (a file:// URL works)"
            ) from None
        if md5 is not None and h.hexdigest() != md5:
            raise DatasetError(f"download from {url}: md5 {h.hexdigest()} does not match the "
                               f"expected {md5}; nothing was saved")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def synthetic_cifar10(n_train: int = 5000, n_test: int = 1000, *, seed: int = 0,
                      noise: float = 0.25, colour_jitter: float = 0.15,
                      num_classes: int = 10, size: int = 32) -> ImageData:
    r"""A learnable 3×size×size dataset (default CIFAR-10's shapes), deterministic from ``seed``.

    Class k has a mean colour c_k ∈ [0.2, 0.8]³ and a grating of spatial frequency f_k (cycles per
    image) and orientation θ_k. Image i of class k is, per channel and pixel (x, y) ∈ [0, 1)²,

        x_i = clip(c_k + τ ζ_i + a_i · w_k · cos(2π f_k (x cos θ_k + y sin θ_k) + φ_i) + σ ξ, 0, 1)

    with a per-image colour shift ζ_i ~ N(0, I₃) of scale τ = ``colour_jitter``, a random
    amplitude a_i ∈ [0.1, 0.3] and phase φ_i, per-channel grating weights w_k, and i.i.d.
    Gaussian pixel noise ξ of standard deviation σ = ``noise``; then quantised to uint8. The
    colour shifts make the colours of different classes overlap, so a classifier must use the
    texture (frequency and orientation) as well as the colour.

    >>> d = synthetic_cifar10(20, 10, seed=1)
    >>> d.train_images.shape, d.train_images.dtype, d.test_labels.shape
    ((20, 3, 32, 32), dtype('uint8'), (10,))
    """
    for name, v in (("n_train", n_train), ("n_test", n_test), ("num_classes", num_classes),
                    ("size", size)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    for name, v in (("noise", noise), ("colour_jitter", colour_jitter)):
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite non-negative std, got {v!r}")
    class_seq, train_seq, test_seq = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(class_seq)
    colour = rng.uniform(0.2, 0.8, size=(num_classes, 3))
    freq = rng.uniform(1.5, 6.0, size=num_classes)
    angle = rng.uniform(0.0, np.pi, size=num_classes)
    weights = rng.uniform(-1.0, 1.0, size=(num_classes, 3))
    size = int(size)
    grid = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")

    def make(n: int, stream: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        labels = stream.permutation(np.arange(n) % num_classes).astype(np.int64)
        amp = stream.uniform(0.1, 0.3, size=n)
        phase = stream.uniform(0.0, 2 * np.pi, size=n)
        tint = colour[labels] + colour_jitter * stream.standard_normal((n, 3))
        images = np.empty((n, 3, size, size), dtype=np.uint8)
        for lo in range(0, n, 4096):  # chunks keep the float64 temporaries small
            k, sl = labels[lo:lo + 4096], slice(lo, lo + 4096)
            arg = (xx[None] * np.cos(angle[k])[:, None, None]
                   + yy[None] * np.sin(angle[k])[:, None, None])
            wave = np.cos(2 * np.pi * freq[k][:, None, None] * arg + phase[sl, None, None])
            img = (tint[sl][:, :, None, None]
                   + (amp[sl, None] * weights[k])[:, :, None, None] * wave[:, None]
                   + noise * stream.standard_normal((k.size, 3, size, size)))
            images[sl] = np.round(np.clip(img, 0.0, 1.0) * 255)
        return images, labels

    tx, ty = make(int(n_train), np.random.default_rng(train_seq))
    vx, vy = make(int(n_test), np.random.default_rng(test_seq))
    classes = tuple(f"class{k}" for k in range(num_classes))
    source = f"synthetic(seed={seed})" if size == 32 else f"synthetic(seed={seed}, size={size})"
    return ImageData(tx, ty, vx, vy, classes, source)


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (images) or per-feature (vectors) mean and std of training data, after the
    1/255 scaling of uint8; a std below 1e-6 (a constant pixel or feature) is set to 1."""
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    xs = x.astype(np.float64) * scale
    mean = xs.mean(axis=axes)
    std = xs.std(axis=axes)
    std = np.where(std < 1e-6, 1.0, std)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


DIGITS_TEST_SIZE = 360  # test images of the fixed stratified digits split (20%)


def load_digits_data() -> ImageData:
    """scikit-learn's digits as (n, 1, 8, 8) float32 in [0, 1]: 1,437 training and 360 test
    images from a fixed stratified split (``random_state=0``; see the module docstring).

    >>> d = load_digits_data()
    >>> d.train_images.shape, d.test_images.shape, d.num_classes
    ((1437, 1, 8, 8), (360, 1, 8, 8), 10)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    x = (raw.images / 16.0).astype(np.float32)[:, None]
    y = raw.target.astype(np.int64)
    tr, te = train_test_split(np.arange(y.size), test_size=DIGITS_TEST_SIZE, stratify=y,
                              random_state=0)
    tr, te = np.sort(tr), np.sort(te)
    mean, std = _channel_stats(x[tr])
    return ImageData(x[tr], y[tr], x[te], y[te], tuple(str(k) for k in range(10)), "digits",
                     mean, std)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_array(f, path, key):
    try:
        return f[key]
    except ValueError:  # allow_pickle=False refuses object arrays
        raise DatasetError(f"{path}: {key} is an object array (only numeric arrays are "
                           "supported)") from None
    except Exception as e:  # noqa: BLE001 - a damaged member: any of several exception types
        raise DatasetError(f"{path}: {key} cannot be read ({type(e).__name__}: {e})") from None


def _check_x(path, key, x) -> np.ndarray:
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
        raise DatasetError(f"{path}: {key} must be uint8 or float, got {x.dtype}")
    if x.ndim not in (2, 3, 4):
        raise DatasetError(f"{path}: {key} must be shaped (N, H, W), (N, C, H, W) or "
                           f"(N, features), got shape {x.shape}")
    if x.shape[0] == 0:
        raise DatasetError(f"{path}: {key} holds no examples")
    if x.dtype != np.uint8:
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise DatasetError(f"{path}: {key} has {bad} non-finite values (NaN or inf)")
        x = x.astype(np.float32)
    return x[:, None] if x.ndim == 3 else x


def _check_y(path, key, y, n: int, xkey: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: {key} must be a 1-D array of integer labels, got "
                           f"shape {y.shape} {y.dtype}")
    if y.shape[0] != n:
        raise DatasetError(f"{path}: {key} has {y.shape[0]} labels but {xkey} has {n} examples")
    return y.astype(np.int64)


def load_npz(path) -> ImageData:
    """A user's data set from an ``.npz`` file (format and checks in the module docstring).

    Raises:
      FileNotFoundError: no such file.
      DatasetError: a malformed file (one line naming the array and the problem).
    """
    import zipfile

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DatasetError(f"{path}: not a readable .npz file ({type(e).__name__}: "
                           f"{' '.join(str(e).split())})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: a single .npy array, not an .npz archive of "
                           f"{', '.join(NPZ_KEYS)}")
    with f:
        missing = [k for k in NPZ_KEYS if k not in f.files]
        if missing:
            raise DatasetError(f"{path}: missing array(s) {', '.join(missing)} (found: "
                               f"{', '.join(sorted(f.files)) or 'none'})")
        xtr = _check_x(path, "x_train", _npz_array(f, path, "x_train"))
        xte = _check_x(path, "x_test", _npz_array(f, path, "x_test"))
        ytr = _check_y(path, "y_train", _npz_array(f, path, "y_train"), xtr.shape[0], "x_train")
        yte = _check_y(path, "y_test", _npz_array(f, path, "y_test"), xte.shape[0], "x_test")
        names = _npz_array(f, path, "classes") if "classes" in f.files else None
    if xtr.shape[1:] != xte.shape[1:]:
        raise DatasetError(f"{path}: x_train examples are shaped {xtr.shape[1:]} but x_test "
                           f"examples {xte.shape[1:]}")
    if xtr.dtype != xte.dtype:
        raise DatasetError(f"{path}: x_train is {xtr.dtype} but x_test is {xte.dtype}; use one "
                           "dtype (uint8 or float)")
    if names is not None:
        names = tuple(str(v) for v in np.asarray(names).reshape(-1))
        k, where = len(names), f"K = {len(names)} from classes"
    else:
        k, where = int(ytr.max()) + 1, "K = 1 + the largest y_train label"
    for key, y in (("y_train", ytr), ("y_test", yte)):
        if y.min() < 0 or y.max() >= k:
            raise DatasetError(f"{path}: {key} has labels outside 0…{k - 1} ({where}): "
                               f"min {int(y.min())}, max {int(y.max())}")
    if np.unique(ytr).size < 2:
        raise DatasetError(f"{path}: y_train holds fewer than two classes "
                           f"({np.unique(ytr).size}); a classifier needs at least two")
    mean, std = _channel_stats(xtr)
    classes = names if names is not None else tuple(str(c) for c in range(k))
    return ImageData(xtr, ytr, xte, yte, classes, str(path), mean, std)


DATA_KINDS = ("digits", "synthetic", "cifar10")


def load_data(kind: str, *, data_dir=None, md5: str | None = None, download: bool = False,
              seed: int = 0, n_synthetic: tuple[int, int] = (5000, 1000),
              synthetic_size: int = 32) -> ImageData:
    """Entry point of the CLIs: ``kind`` is ``"digits"``, ``"synthetic"``, ``"cifar10"`` (or its
    alias ``"cifar"``), or the path of an ``.npz`` file.

    For CIFAR-10, ``data_dir`` defaults to :func:`default_data_dir` and ``md5`` to
    :func:`default_md5`; ``download=True`` fetches the archive first, from :func:`default_url`,
    if it is not there. The
    synthetic set has ``n_synthetic`` = (train, test) images of ``synthetic_size`` pixels drawn
    from ``seed``.
    """
    if kind == "synthetic":
        return synthetic_cifar10(*n_synthetic, seed=seed, size=synthetic_size)
    if kind == "digits":
        return load_digits_data()
    if kind not in ("cifar", "cifar10"):
        if str(kind).endswith(".npz") or Path(str(kind)).expanduser().is_file():
            return load_npz(kind)
        raise ValueError(f"data must be one of {', '.join(DATA_KINDS)} or a path to an .npz "
                         f"file, got {kind!r}")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    md5 = default_md5() if md5 is None else md5
    if download:
        try:
            find_cifar10(root)
        except FileNotFoundError:
            download_cifar10(root, md5=md5)
    return load_cifar10(root, md5=md5)
