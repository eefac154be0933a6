"""Keep freed CPU memory in the process instead of returning it to the OS after every step.

glibc serves allocations above its mmap threshold (at most 32 MB) with fresh ``mmap`` pages and
unmaps them on free. GLA's per-round tensors at large inputs are hundreds of MB, so every forward
pass page-faults them in again: at 192x192 this made GLA's time grow faster than linearly with
the image size (1 million page faults per step, a quarter of the time). Serving everything from the
heap and never trimming it removes most of those faults, at the price of a higher peak RSS (heap
fragmentation) and memory kept after the peak. It is therefore opt-in: the usual advice for
PyTorch on CPU (like preloading jemalloc or tcmalloc), applied from inside the process.
``scripts/benchmark_gla.py --keep-freed-memory`` measures both sides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's malloc.h
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc's malloc not to use mmap and not to trim the heap. Returns True if applied.

    A no-op (False) outside Linux/glibc. Call it once at program start; it does not affect CUDA
    memory, which PyTorch's caching allocator already keeps.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**62) == 1
    if not applied:
        log.debug("mallopt refused the allocator settings; keeping the defaults")
    return applied
