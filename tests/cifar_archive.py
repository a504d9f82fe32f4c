"""Generated CIFAR-10 python archives for the loader and CLI tests (shared helper, not tests)."""

import hashlib
import io
import pickle
import struct
import tarfile

import numpy as np

from validate import data

MEMBERS = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def py2_pickle(obj, dtype_flags=0) -> bytes:
    """A protocol-2 pickle written the way Python 2's cPickle wrote the official CIFAR-10 files
    (an independent re-implementation of that byte format, not Python 3's pickler): bytes as
    Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), ints as BININT*, dicts and lists filled with
    SETITEMS / APPENDS, and NumPy arrays as ``numpy.core.multiarray._reconstruct(numpy.ndarray,
    (0,), 'b')`` followed by BUILD with (1, shape, dtype, False, raw bytes), the dtype as
    ``numpy.dtype('u1', 0, 1)`` + BUILD (3, '|', None, None, None, -1, -1, ``dtype_flags``).
    Supports bytes, bool, int, None, tuples, lists, dicts and C-contiguous numeric arrays."""
    out = [b"\x80\x02"]

    def emit(o):
        if isinstance(o, bytes):
            out.append(b"U" + bytes([len(o)]) + o if len(o) < 256
                       else b"T" + struct.pack("<I", len(o)) + o)
        elif isinstance(o, bool):
            out.append(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.append(b"K" + bytes([o]) if 0 <= o < 256
                       else b"M" + struct.pack("<H", o) if 0 <= o < 65536
                       else b"J" + struct.pack("<i", o))
        elif o is None:
            out.append(b"N")
        elif isinstance(o, tuple):
            out.append(b"(")
            for v in o:
                emit(v)
            out.append(b"t")
        elif isinstance(o, list):
            out.append(b"]")
            if o:
                out.append(b"(")
                for v in o:
                    emit(v)
                out.append(b"e")
        elif isinstance(o, dict):
            out.append(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.append(b"u")
        elif isinstance(o, np.ndarray):
            out.append(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            emit((0,))
            emit(b"b")
            out.append(b"\x87R(")  # TUPLE3, REDUCE, MARK of the state tuple
            emit(1)
            emit(tuple(int(v) for v in o.shape))
            out.append(b"cnumpy\ndtype\n")
            emit(o.dtype.str[1:].encode())
            emit(0)
            emit(1)
            out.append(b"\x87R")
            emit((3, o.dtype.str[:1].encode(), None, None, None, -1, -1, dtype_flags))
            out.append(b"b")  # BUILD the dtype
            emit(False)
            emit(np.ascontiguousarray(o).tobytes())
            out.append(b"tb")  # the state tuple, BUILD the array
        else:
            raise TypeError(f"py2_pickle: unsupported {type(o).__name__}")

    emit(obj)
    out.append(b".")
    return b"".join(out)


def member_dicts(batches, names=data.CIFAR10_CLASSES):
    """The dicts the official members hold, for ``batches`` (member → (rows, labels))."""
    out = {name: {b"batch_label": name.encode(), b"labels": y, b"data": x,
                  b"filenames": [b"img.png"] * len(y)} for name, (x, y) in batches.items()}
    out["batches.meta"] = {b"label_names": [n.encode() for n in names],
                           b"num_cases_per_batch": 10000, b"num_vis": 3072}
    return out


def write_members(path, raw_members):
    """Write a .tar.gz of cifar-10-batches-py/<name> members from ``name → bytes``, or
    ``name → tarfile.TarInfo`` (with its bytes as ``(info, raw)``); returns the md5."""
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in raw_members.items():
            if isinstance(raw, tuple):
                info, raw = raw
            else:
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw) if raw is not None else None)
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def write_archive(path, batches, names=data.CIFAR10_CLASSES, protocol=2, extra=None):
    """Write a .tar.gz exactly like the official one: cifar-10-batches-py/<member>, each a
    pickled dict with bytes keys (protocol 2 by default, as the original Python 2 files, with
    arrays pickled by NumPy's own ndarray.__reduce__; ``protocol="py2"`` writes them with
    :func:`py2_pickle`, byte for byte like Python 2). ``batches`` maps member name →
    ((n, 3072) uint8 rows, list of int labels); ``extra`` maps a member name to more dict
    entries (e.g. an object with a malicious ``__reduce__``). Returns the md5."""
    dicts = member_dicts(batches, names)
    for name, more in (extra or {}).items():
        dicts[name].update(more)
    dump = py2_pickle if protocol == "py2" else (lambda o: pickle.dumps(o, protocol=protocol))
    return write_members(path, {name: dump(d) for name, d in dicts.items()})


def split_into_batches(images, labels, test_images, test_labels, per_batch):
    """(n, 3, 32, 32) images → the six members: 5 training batches of ``per_batch`` rows
    (RGB planes flattened to 3072 bytes) and the test batch."""
    def rows(x):
        return np.ascontiguousarray(x.reshape(len(x), 3072))

    out = {}
    for i in range(5):
        sl = slice(i * per_batch, (i + 1) * per_batch)
        out[MEMBERS[i]] = (rows(images[sl]), [int(v) for v in labels[sl]])
    out["test_batch"] = (rows(test_images), [int(v) for v in test_labels])
    return out
