"""Generated CIFAR-10 python archives for the loader and CLI tests (shared helper, not tests)."""

import hashlib
import io
import pickle
import tarfile

import numpy as np

from validate import data

MEMBERS = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_archive(path, batches, names=data.CIFAR10_CLASSES):
    """Write a .tar.gz exactly like the official one: cifar-10-batches-py/<member>, each a
    pickled dict with bytes keys (protocol 2, as the original Python 2 files). ``batches``
    maps member name → ((n, 3072) uint8 rows, list of int labels); returns the md5."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))

        for name, (x, y) in batches.items():
            add(name, {b"batch_label": name.encode(), b"labels": y, b"data": x,
                       b"filenames": [b"img.png"] * len(y)})
        add("batches.meta", {b"label_names": [n.encode() for n in names],
                             b"num_cases_per_batch": 10000, b"num_vis": 3072})
    return hashlib.md5(open(path, "rb").read()).hexdigest()


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
