"""C library calls that Python's os module lacks, through ctypes: glibc's mallopt (fp8norm._memory)
and Linux's sync_file_range (fp8norm.st_io.Writeback). `function` is None where there is no such call."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        # the C library this interpreter runs on; ctypes.util.find_library would spawn ldconfig (~15 ms)
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


@functools.cache
def function(name: str, argtypes: tuple, restype=ctypes.c_int):
    """The C library's `name`, typed, or None."""
    lib = _libc()
    f = getattr(lib, name, None) if lib is not None else None
    if f is not None:
        f.argtypes, f.restype = list(argtypes), restype
    return f
