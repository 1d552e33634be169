"""Checks of a source checkpoint made before anything is read back or written: each a PlanError of one
line naming the file and tensor. Below fp8norm.formats and fp8norm.plan, which both use them."""

from __future__ import annotations

import torch

from .kernels.numerics import fp8_block as nx
from .checkpoint import SourceCheckpoint
from .st_io import read_tensor

SOURCE_SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")  # block scales of FP8 sources that are read


class PlanError(ValueError):
    """A source or option that cannot be planned; the message names the file, tensor or option."""


def check_fp8_sources(ckpt: SourceCheckpoint, scale_of: dict[str, str], block_size) -> None:
    """FP8 weights read or carried, and their block scales, before anything is written: E4M3 only;
    scales of a float dtype, of the block grid's shape, finite and > 0 (each scale is read: they are
    1/16384 of their weight)."""
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
        values = read_tensor(sc).float()
        bad = ~(torch.isfinite(values) & (values > 0))
        if bool(bad.any()):
            first = [int(i) for i in bad.nonzero()[0].tolist()]
            raise PlanError(f"{sc.file.name}: scale {sname!r} holds {int(bad.sum())} value(s) that are not finite "
                            f"and > 0 (first {float(values[tuple(first)])} at {first}); its weight cannot be read")
