"""Keeping freed memory: after keep_freed_memory(), blocks freed at the end of one step are
reused by the next without the kernel faulting their pages in again."""
import subprocess
import sys

import pytest

from largebatch.malloc import glibc

# Four blocks allocated, written and freed, ten times over, as a step's activations are;
# the page faults of the last ten rounds are counted. 8 MiB blocks are above glibc's
# default mmap threshold, 48 MiB ones above the most that threshold can be raised to.
ROUNDS = """
import ctypes, resource, sys
from largebatch.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = int(sys.argv[2]) << 20
def step():
    blocks = [libc.malloc(size) for _ in range(4)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, mib: int) -> int:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode, str(mib)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(glibc() is None, reason="glibc's malloc")
@pytest.mark.parametrize("mib", [8, 48])
def test_freed_memory_is_reused_without_page_faults(mib):
    pages = 10 * 4 * (mib << 20) // 4096
    assert page_faults("keep", mib) < 0.02 * pages
    # what it is kept from: the C library's default gives the memory back every round
    assert page_faults("default", mib) > 0.5 * pages
