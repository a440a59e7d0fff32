"""glibc malloc settings for a CPU engine: memory a step frees stays mapped for the next step.

A prefill step allocates and frees activations of tens of MB whose sizes change from step to step (the
[tokens, 3072] gate/up projection of SmolLM2 is 10-20 MB). glibc hands blocks above its mmap threshold back
to the kernel on free and trims the heap's free top, so the next step takes a page fault for every 4 KiB page
it writes again; in a VM a fault costs more than the matmul writing the page: that projection over 1,583
tokens took 5.2 ms into pages already mapped and 18 ms into fresh ones (2-core EPYC VM, bf16), and a 32-prompt
uncached prefill went from 1.83 to 1.43 s with the settings below. M_MMAP_THRESHOLD at its 32 MiB cap and
M_TRIM_THRESHOLD out of reach keep those pages: the process's resident memory stays at its high-water mark,
as with tcmalloc or jemalloc (which vLLM's CPU guide preloads). Process-wide; EngineConfig.cpu_keep_freed_memory
turns it off.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_CAP = 32 << 20  # glibc's largest M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top before a trim, in effect never

_applied = False


def keep_freed_heap_memory() -> bool:
    """Set the two thresholds (once per process). False where the C library is not glibc: nothing changed."""
    global _applied
    if _applied:
        return True
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CAP)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
