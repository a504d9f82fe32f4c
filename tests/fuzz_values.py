"""Bad and extreme argument values shared by the API fuzz tests (tests/test_fuzz_api.py,
tests/test_theory_fuzz.py): each public function must refuse MUST_REJECT by name and handle
EXTREME without NaN, a raw NumPy error or a warning."""

from __future__ import annotations

import numpy as np


class Opaque:
    """An object no numeric argument may accept."""


MUST_REJECT = {
    "None": None, "str": "1.0", "str2": "abc", "bytes": b"1", "complex": 1 + 0j,
    "complex5": 1 + 5j, "npcomplex": np.complex128(2), "complexarr": np.array([1 + 5j]),
    "complexarr0": np.array([2 + 0j]), "int1": 1, "bool": True, "npbool": np.bool_(True),
    "boolarr": np.array([True, False]), "object": Opaque(), "dict": {}, "list_none": [1, None],
    "ragged": [[1.0, 2.0], [3.0]], "strlist": ["1", "2"], "nan": float("nan"),
    "nanarr": np.array([np.nan]), "inf": float("inf"), "-inf": -float("inf"),
}
EXTREME = {
    "empty": [], "emptyarr": np.array([]), "2d": [[1.0]], "bigint": 10**400, "-1": -1, "0": 0,
    "-0.0": -0.0, "1e308": 1e308, "1e300": 1e300, "1e155": 1e155, "1e-300": 1e-300,
    "5e-324": 5e-324, "-1e-300": -1e-300, "int64": np.int64(8), "float32": np.float32(0.5),
    "float16": np.float16(2.0), "0d": np.array(2.0), "1d": np.array([2.0]), "2**70": 2**70,
    "uint64": np.uint64(3), "big_list": [1e308, 1e308], "tiny_list": [5e-324, 1e-310],
    "list3": [1.0, 2.0, 3.0], "neg_list": [-1.0, 1.0], "half": 0.5, "two": 2,
}
