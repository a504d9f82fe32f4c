r"""Settle glibc's adaptive allocation thresholds once per process (docs/design.md §9).

glibc starts by serving every block over 128 KiB with a fresh ``mmap`` and by returning the free
top of its heap to the system beyond 256 KiB, raising both thresholds only as larger blocks are
freed (the mmap threshold to the freed size, up to 32 MiB; the trim threshold to twice that).
Until a large block has been freed, NumPy code that allocates and frees arrays of a few MiB
many times (the exact NQM's per-group bounds: 19 batch sizes × 10⁴ dimensions) pays a page
fault per 4 KiB every time: measured, the paper's EMA grid took 11.3 s of CPU on one core from
a fresh process and 4.2 s after :func:`settle`. Freeing one 31 MiB block brings both
thresholds to the steady state the process would reach later anyway; elsewhere (other C
libraries, other systems) it costs a malloc and a free.
"""

from __future__ import annotations

import numpy as np

__all__ = ["settle"]

_SETTLED = False


def settle() -> None:
    """Allocate and free one 31 MiB block, once per process (idempotent, ~10 µs)."""
    global _SETTLED
    if not _SETTLED:
        _SETTLED = True
        np.empty((31 << 20) // 8)  # freed at once (never touched: no pages are faulted in)
