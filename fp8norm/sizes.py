"""Byte sizes as users write them: 4GB, 500MB, 4GiB, 1.5G, 123456."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "T": 1000**4, "TB": 1000**4, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str | int) -> int:
    """'4GB' -> 4_000_000_000, '4GiB' -> 4_294_967_296 (decimal units are powers of 1000, as in HF)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m[2].upper() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 4GB, 500MB, 4GiB)")
    size = int(float(m[1]) * _UNITS[m[2].upper()])
    if size <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return size
