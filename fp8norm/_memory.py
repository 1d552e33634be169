"""Keep streamed tensor buffers from piling up in glibc's heaps.

glibc raises its mmap threshold each time a large mmapped block is freed, after which blocks of that
size come from per-thread heaps that rarely shrink: with a reader, a compute and a writer thread
each allocating shard-sized buffers, resident memory grew to ~3x the pipeline's byte budgets (seen:
119 MB above baseline for 32 MB shards, 43 MB with a fixed threshold). A fixed 1 MiB threshold makes
every tensor buffer an mmap that goes back to the OS when freed.
"""

import ctypes
import sys

from . import libc

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Free memory at the top of a heap kept rather than given back: fixing the mmap threshold also fixes
# glibc's trim threshold at its 128 KiB default, so every freed chunk temporary (up to 1 MiB) went
# back to the OS and the next one faulted its pages in again: the check after writing ran 2.2x
# slower with 512 KiB temporaries than with 4 MiB kept.
TRIM_BYTES = 4 << 20
_done = False


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold and its trim threshold (process-wide, once). False where there is
    no glibc."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    mallopt = libc.function("mallopt", (ctypes.c_int, ctypes.c_int))
    _done = (mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, nbytes))
             and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)))
    return _done
