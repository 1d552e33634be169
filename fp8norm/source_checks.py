"""Checks of a source checkpoint made before anything is read back or written: each a PlanError of one
line naming the file and tensor. Below fp8norm.formats and fp8norm.plan, which both use them."""

from __future__ import annotations

import math
import sys

from .kernels.numerics import block_grid as nx
from .checkpoint import SourceCheckpoint
from .st_io import TensorInfo, read_bytes, read_floats

SOURCE_SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")  # block scales of FP8 sources that are read
# A float is finite and > 0 iff its bits, read as an unsigned integer, lie in [1, the largest finite
# value's bits]: sign clear, not zero, below infinity and NaN. E8M0 codes are 2^(e - 127) but for 255 (NaN).
_POSITIVE_FINITE_BITS = {"F32": ("I", 0x7F7FFFFF), "BF16": ("H", 0x7F7F), "F16": ("H", 0x7BFF)}
# Up to this many scale values in all, they are checked in plain Python (~70 ns a value) rather than
# with numpy, whose import (40-70 ms) is most of a small repack's start; a 700 GB FP8 checkpoint has
# ~40 M scales, checked with numpy.
FEW_SCALES = 1 << 20


class PlanError(ValueError):
    """A source or option that cannot be planned; the message names the file, tensor or option."""


def check_fp8_sources(ckpt: SourceCheckpoint, scale_of: dict[str, str], block_size) -> None:
    """FP8 weights read or carried, and their block scales, before anything is written: E4M3 only;
    scales of a float dtype, of the block grid's shape, finite and > 0 (each scale is read: they are
    1/16384 of their weight)."""
    few = sum(math.prod(ckpt.tensors[s].shape) for s in scale_of.values()) <= FEW_SCALES
    for name, sname in scale_of.items():
        w, sc = ckpt.tensors[name], ckpt.tensors[sname]
        where = f"{w.file.name}: tensor {name!r}"
        if w.dtype != "F8_E4M3":
            raise PlanError(f"{where} is {w.dtype}: fp8norm reads F8_E4M3 FP8 weights (with block scales) only")
        if sc.dtype not in SOURCE_SCALE_DTYPES:
            raise PlanError(f"{sc.file.name}: scale {sname!r} is {sc.dtype}; block scales are read as "
                            f"{', '.join(SOURCE_SCALE_DTYPES)}")
        expected = nx.scale_inv_shape(w.shape, block_size) if len(w.shape) >= 2 else None
        if expected is None or tuple(sc.shape) != expected:
            raise PlanError(f"{sc.file.name}: scale {sname!r} has shape {list(sc.shape)}, but {name!r} "
                            f"{list(w.shape)} with {block_size[0]}x{block_size[1]} blocks needs "
                            f"{list(expected) if expected else 'a 2D or 3D weight'}")
        if few and scales_positive_finite(sc):
            continue
        import numpy as np  # (the values, and the first bad one named)

        values = read_floats(sc)
        bad = ~(np.isfinite(values) & (values > 0))
        if bool(bad.any()):
            first = [int(i) for i in np.argwhere(bad)[0].tolist()]
            raise PlanError(f"{sc.file.name}: scale {sname!r} holds {int(bad.sum())} value(s) that are not finite "
                            f"and > 0 (first {float(values[tuple(first)])} at {first}); its weight cannot be read")


def scales_positive_finite(info: TensorInfo) -> bool:
    """Every value of a scale tensor (a SOURCE_SCALE_DTYPES dtype) finite and > 0, read off its bits
    in plain Python (_POSITIVE_FINITE_BITS)."""
    raw = read_bytes(info)
    if info.dtype == "F8_E8M0":
        return raw.find(255) < 0
    if sys.byteorder != "little":  # (safetensors is little-endian)
        return False
    code, top = _POSITIVE_FINITE_BITS[info.dtype]
    bits = memoryview(raw).cast(code)
    return not bits or (min(bits) >= 1 and max(bits) <= top)
