"""Let a Dask worker reuse the memory a volume task frees instead of faulting it in afresh.

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed memory
goes back to the operating system quickly.  Setting any glibc malloc threshold also switches
off glibc's dynamic mmap threshold, so from then on every allocation of 128 KiB or more (each
inner chunk's buffer, each slab, each compressed shard) is a fresh ``mmap`` whose pages are
zero-filled on first touch and returned on ``free``.  A volume task allocates and frees
hundreds of such buffers: measured on a 100-slice 512² series, 170,000 page faults and
0.24–0.42 s of system time per task instead of 7,500 faults and 0.07–0.15 s, which made a
task cost ~45 % more CPU on a worker than in a plain process.

:func:`reuse_freed_memory` raises the thresholds again: buffers up to 8 MiB are recycled
from the heap, larger ones (slabs, whole volumes) are still mapped and returned whole, and
a worker keeps at most 16 MiB of freed heap per malloc arena before giving it back.
Measured on a worker converting a 200-slice 512² volume (105 MB raw), per task:

==========================  ===========  ==========  =====================
thresholds (mmap / trim)    page faults  CPU s       peak RSS above floor
==========================  ===========  ==========  =====================
nanny's (128 KiB / 64 KiB)  321,000      1.14–1.15   208 MB (1.98×)
**8 MiB / 16 MiB**          41,000       0.76–0.86   256 MB (2.44×)
32 MiB / 64 MiB (glibc's)   700          0.75–0.80   306 MB (2.92×)
==========================  ===========  ==========  =====================

glibc's own ceiling would save the last faults but keep ~50 MB more per worker, close to
the 3× memory budget the deployment recipes plan for.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Allocations up to this size come from (and go back to) the heap.
MMAP_THRESHOLD = 8 * 2**20
#: Freed heap kept per arena before it is returned (twice the above, as glibc's own rule).
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def reuse_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Set this process's malloc thresholds as described above; ``False`` where there is no
    glibc ``mallopt`` (macOS, musl, Windows) or it refused, and nothing changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # glibc refuses (returns 0) an mmap threshold above its 32 MiB maximum
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and (
        mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    )
