"""Keep freed memory in the process instead of handing it back to the kernel every step.

glibc's malloc serves blocks above its mmap threshold with mmap and gives them back with
munmap when freed, and trims the top of the heap when enough of it is free. A training
step frees and reallocates the same activations every step, so by default each step
pays page faults (and the kernel's zeroing) for memory it had a moment ago. Serving
every block from the heap (no mmap at all: raising the mmap threshold stops at 32 MiB on
64-bit systems, and a ResNet-50 activation at 64 images per process is larger) and
putting the trim threshold out of reach keeps that memory in the heap, where the next
step finds it. The price is a process that holds on to its peak heap, which a training
process does anyway.

Only glibc has mallopt with these meanings; elsewhere (macOS, musl) nothing changes.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4  # how many blocks may be mmapped at once: 0 serves them all from the heap
TRIM_NEVER = 2**31 - 1  # mallopt takes an int
# The same settings for a process started under them (what GLIBC_TUNABLES takes)
TUNABLES = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={TRIM_NEVER}"


def glibc() -> ctypes.CDLL | None:
    """The process's own C library (already loaded: no search for it) when it is glibc."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Set glibc's malloc for this process (and the processes it forks later). True when
    it was set, False where the C library is not glibc."""
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))
