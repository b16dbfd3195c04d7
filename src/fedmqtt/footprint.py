"""A device process's footprint: XLA's threads, and the memory it stops needing once it is trained once.

An idle ``fedmqtt edge`` is large for three reasons, none of them the model (digits: 9k parameters):

- Threads. XLA's CPU client sizes its compute pools by the CPUs the process may use. ``PJRT_NPROC`` sizes
  them instead; XLA reads it when JAX's backend starts, so :func:`limit_threads` must run before the first
  array is made. It also stops numpy's OpenBLAS threads (one per CPU but the first, idle in a device: the
  edge's numpy work is too small for them); OpenBLAS then computes on the calling thread. Compiling without
  constant folding (:data:`COMPILER_OPTIONS`) keeps XLA from starting its pool for evaluating constants, one
  thread per CPU. Others stay whatever the setting: a pool of 8 compiler threads (fixed in XLA's build), the
  code generator's and MLIR's pools (one thread per CPU each), a watchdog.
- Compiling the local round leaves freed memory in glibc's heaps; ``malloc_trim`` returns it to the system.
- Resident memory counts every page of the XLA runtime library (350 MB, mostly code) the process has
  touched, and most were run once: at import (static initialisers) and while compiling. :func:`hand_back`
  drops the library's clean, read-only pages from the process (``madvise``); those a local round needs
  (about 10 MB) come back from the page cache on first use.

:data:`COMPILER_OPTIONS` make compiling the local round itself smaller and start fewer threads. Apart from
them, Linux and glibc only; elsewhere each step does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("fedmqtt.footprint")
MADV_DONTNEED, MADV_PAGEOUT = 4, 21  # from <linux/mman.h>; PAGEOUT since Linux 5.4
COMPILER_OPTIONS = {
    # XLA's previous code generator for fused loops: compiling the digits round peaks about 40 MB lower, and
    # a round of a small model takes about as long (well under the time an update spends on the wire).
    "xla_cpu_use_fusion_emitters": False,
    # The round's few constant expressions (index bounds, fills) are computed in the round rather than while
    # compiling, where XLA would start a pool of one thread per CPU that then stays idle. Same results, and a
    # round takes as long (digits and hapt).
    "xla_disable_hlo_passes": "constant_folding",
}
_BLAS_THREADS = (
    "openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
)
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def limit_threads(threads: int) -> None:
    """Size XLA's CPU compute pools to ``threads`` (before JAX's backend starts; later it changes nothing) and
    stop numpy's OpenBLAS threads."""
    os.environ["PJRT_NPROC"] = str(threads)
    single_threaded_blas()


def single_threaded_blas() -> bool:
    """Set the OpenBLAS this process loaded (numpy's) to one thread and stop the threads it started at import:
    it computes on the calling thread from then on and starts none again. Call it while no other thread uses
    BLAS. False where there is no OpenBLAS (another BLAS, or not Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    done = False
    for path in sorted({line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1].lower()}):
        lib = ctypes.CDLL(path)
        setter = next((getattr(lib, name) for name in _BLAS_THREADS if hasattr(lib, name)), None)
        if setter is not None and hasattr(lib, "blas_thread_shutdown_"):
            setter(1)  # first: a call with more threads would start them again
            lib.blas_thread_shutdown_()
            done = True
    return done


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


def clean_library_mappings(smaps: str, directory: str) -> list[tuple[int, int]]:
    """Address ranges, from the text of ``/proc/<pid>/smaps``, of the read-only mappings of files under
    ``directory`` that hold no private copy of a page (no relocations written into them): dropping their
    pages loses nothing, a later access reads the file again.

    >>> smaps = "\\n".join([
    ...     "7f00-7f10 r-xp 00000000 08:01 12 /lib/x/libx.so", "Anonymous:  0 kB",
    ...     "7f10-7f20 r--p 00010000 08:01 12 /lib/x/libx.so", "Anonymous:  8 kB",  # relocated
    ...     "7f20-7f30 rw-p 00020000 08:01 12 /lib/x/libx.so", "Anonymous:  0 kB",
    ...     "7f30-7f40 r-xp 00000000 08:01 13 /lib/y/liby.so", "Anonymous:  0 kB"])
    >>> [(hex(a), hex(b)) for a, b in clean_library_mappings(smaps, "/lib/x")]
    [('0x7f00', '0x7f10')]
    """
    found: list[list[int]] = []  # start, end, kB of private (anonymous) pages
    current: list[int] | None = None
    prefix = directory.rstrip("/") + "/"
    for line in smaps.splitlines():
        m = _MAPPING.match(line)
        if m:
            start, end, perms, path = m.groups()
            current = [int(start, 16), int(end, 16), 0] if "w" not in perms and path.startswith(prefix) else None
            if current is not None:
                found.append(current)
        elif current is not None and line.startswith("Anonymous:"):
            current[2] += int(line.split()[1])
    return [(start, end) for start, end, private in found if private == 0]


def hand_back(directory: str | None = None) -> bool:
    """Return freed heap memory to the system and drop the XLA library's clean pages from the process
    (``directory``: the jaxlib package). False where this is not Linux with glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "madvise"):
        return False
    if directory is None:
        import jaxlib

        directory = str(Path(jaxlib.__file__).parent)
    libc.malloc_trim(0)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        smaps = Path("/proc/self/smaps").read_text()
    except OSError:
        smaps = ""
    dropped = 0
    for start, end in clean_library_mappings(smaps, directory):
        libc.madvise(start, end - start, MADV_PAGEOUT)  # frees the pages no other process maps (errors: old kernel)
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:  # and unmaps the rest from this one
            dropped += end - start
    log.debug("heap trimmed; %d MB of %s mappings dropped", dropped >> 20, directory)
    return True
