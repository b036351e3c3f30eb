"""Memory that tensors free stays with the process, for the next tensors.

glibc's malloc serves blocks over its mmap threshold (at most 32 MiB) with fresh pages and unmaps them when they
are freed, so every training step pays the kernel to fault in and zero CL1's activation maps (~100 MB each at
batch 32) again; on a 2-core machine that cost about as much as the convolutions (`benchmarks/train.py
--allocator-baseline` prints the ratio). Serving every block from the heap and never trimming it, as jemalloc and
tcmalloc do, makes the next step reuse warm pages. The price: the process stays at its peak memory, and a
little above it while the heap settles (an aligned block does not fit into the one just freed, so the first
rounds of a new size grow the heap before freed blocks merge).

No torch here: the `alnet` command calls this before any command runs, and `alnet info` never imports torch.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_kept = False


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never give it back (glibc only); returns whether that holds."""
    global _kept
    if not _kept and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        # mallopt takes a C int: the largest trim threshold it can express (2 GiB of free memory at the top).
        _kept = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _kept
