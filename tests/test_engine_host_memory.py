"""engine/host_memory.py: after keep_freed_heap_memory, a freed 24 MiB block stays mapped (glibc only).

Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone, and glibc's own
threshold moves after the first large free, so only a process's first large block shows the difference.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from rexrag_fast.engine import host_memory

SCRIPT = """
import ctypes, sys
from rexrag_fast.engine.host_memory import keep_freed_heap_memory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
page = 4096
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
if sys.argv[1] == "keep":
    assert keep_freed_heap_memory()
n = 24 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)
before = resident()
libc.free(p)
print((before - resident()) / n)
"""


def _released_fraction(mode: str) -> float:
    """Fraction of a written and freed 24 MiB block that left the process's resident memory."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_freed_block_stays_mapped():
    if not host_memory.keep_freed_heap_memory():
        pytest.skip("the C library is not glibc")
    assert _released_fraction("default") > 0.9  # glibc's default: the block was mmapped and is unmapped
    assert _released_fraction("keep") < 0.1  # kept in the heap for the next allocation
