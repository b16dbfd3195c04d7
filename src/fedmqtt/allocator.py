"""Memory allocator tuning for the aggregator process (glibc only; elsewhere a no-op).

Every update makes new model-sized arrays (a new version, a new running sum) and frees old ones. glibc
serves blocks above its mmap threshold (128 KiB, raised adaptively up to 32 MiB) straight from the kernel
and hands them back on free, so each new array is faulted in page by page again: at 1M parameters that is
about a third of an update's cost. ``tune()`` raises the threshold to 64 MiB and the trim threshold to
256 MiB, so freed arrays are reused from the heap. The price is memory the process keeps after a burst
(at most the trim threshold above what it uses).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("fedmqtt.allocator")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>


def tune(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Apply the thresholds; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    log.debug("malloc thresholds: mmap %d, trim %d (%s)", mmap_threshold, trim_threshold, "set" if ok else "refused")
    return ok
