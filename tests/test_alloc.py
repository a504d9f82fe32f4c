"""sgdtheory._alloc.settle: after it, arrays of a few MiB allocated and freed again and again
reuse the heap's pages instead of faulting them in afresh every time (glibc)."""

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys
import numpy as np
if sys.argv[1] == "settled":
    from sgdtheory import _alloc
    _alloc.settle()
    _alloc.settle()  # idempotent
a = np.ones((2 << 20) // 8); del a  # a history: a 2 MiB block freed (thresholds 2 / 4 MiB)

def cycle():  # ten 1.5 MiB arrays from the heap, touched, freed
    arrs = [np.ones((3 << 19) // 8) for _ in range(10)]
    del arrs

cycle()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's adaptive malloc thresholds are what settle() addresses")
def test_settle_stops_repeated_page_faults():
    # 4 cycles × 15 MiB = 15,360 pages of 4 KiB if the freed heap top is returned each time
    assert faults("plain") > 5000
    assert faults("settled") < 500
