"""The FP8 cut / join / requantize engine of the model-parallel layouts.

A destination tensor is the concatenation of cuts of source tensors along one axis. Plain tensors are
cut and joined as they are. Block-FP8 tensors (`X` F8_E4M3 with `X_scale_inv` on the block grid) are
carried byte for byte, weight and scale tiles together, when every cut falls on the block grid;
otherwise, with `requant`, each source is dequantized once per job and the assembled piece quantized
again (else a ValueError says which rows/columns miss the grid). Used by the Megatron-Core mapping and
the DeepSeek layout alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import numerics as nx
from ..st_io import DTYPES, FP8_DTYPES, OutEntry
from .jobs import ShardJob, SliceOut

SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class Spec:
    """A source tensor as the planner sees it."""
    name: str  # display name
    dtype: str
    shape: tuple
    scale_key: str | None = None
    scale_dtype: str | None = None
    scale_shape: tuple | None = None


@dataclass(frozen=True)
class Cut:
    src: str  # key of the source tensor
    lo: int
    hi: int
    at: int
    axis: int


@dataclass
class Out:
    """A planned destination tensor (and its scale when FP8)."""
    file: str | None
    name: str
    dtype: str
    shape: tuple
    make: Callable
    scale: tuple[str, tuple, Callable] | None = None  # (dtype, shape, make)
    requant: bool = False

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape) * DTYPES[self.dtype].itemsize
        if self.scale:
            n += math.prod(self.scale[1]) * DTYPES[self.scale[0]].itemsize
        return n


@dataclass
class QuantOpts:
    requant: bool
    amax_epsilon: float
    pow2_scales: bool
    block: tuple[int, int]
    hint: str  # what to do about a misaligned piece


def cat(parts: list[torch.Tensor], axis: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, axis)


def grid(shape: tuple, block: tuple[int, int]) -> tuple:
    return tuple(nx.scale_inv_shape(tuple(shape), block))


def plan_out(file: str | None, name: str, cuts: list[Cut], specs: dict[str, Spec], rule: str,
              opts: QuantOpts) -> Out:
    cuts = sorted(cuts, key=lambda c: c.at)
    axis = cuts[0].axis
    first = specs[cuts[0].src]
    pos = 0
    for c in cuts:
        if c.at != pos or c.axis != axis:
            raise RuntimeError(f"internal: {name}: pieces do not tile the tensor ({cuts})")
        pos += c.hi - c.lo
        sp = specs[c.src]
        if sp.dtype != first.dtype:
            raise ValueError(f"{name}: joins {first.name} ({first.dtype}) and {sp.name} ({sp.dtype}); {rule}, so "
                             "they must have the same dtype")
        if (sp.scale_key is None) != (first.scale_key is None):
            raise ValueError(f"{name}: joins {first.name} and {sp.name}, of which only one has block scales "
                             f"({SCALE_SUFFIX}); {rule}, so both must be FP8 or neither")
        if len(sp.shape) != len(first.shape) or any(
                a != b for d, (a, b) in enumerate(zip(sp.shape, first.shape)) if d != axis):
            raise ValueError(f"{name}: joins {first.name} {list(first.shape)} and {sp.name} {list(sp.shape)} along "
                             f"dim {axis}; their other dims differ")
    shape = tuple(pos if d == axis else n for d, n in enumerate(first.shape))
    if first.scale_key is None:
        def make(srcs, cuts=cuts, axis=axis):
            return cat([srcs[c.src].narrow(axis, c.lo, c.hi - c.lo) for c in cuts], axis)
        return Out(file, name, first.dtype, shape, make)

    # FP8: carry bytes and scale tiles when every cut is block-aligned, else requantize (if allowed).
    b = opts.block[axis]
    problems = []
    for idx, c in enumerate(cuts):
        sp = specs[c.src]
        n = sp.shape[axis]
        last = idx == len(cuts) - 1 and c.hi == n
        if c.lo % b or c.at % b or ((c.hi - c.lo) % b and not last):
            unit = "rows" if axis == 0 else "columns"
            problems.append(f"{sp.name} {sp.dtype} {list(sp.shape)}: {rule}; its {unit} [{c.lo}, {c.hi}) go to "
                            f"{unit} [{c.at}, {c.at + c.hi - c.lo}) of {name}, which is not on the {b}-{unit[:-1]} "
                            "FP8 block grid")
    scale_dtypes = {specs[c.src].scale_dtype for c in cuts}
    if len(scale_dtypes) > 1 and not problems:
        problems.append(f"{name}: joins FP8 tensors whose scales have different dtypes {sorted(scale_dtypes)}")
    scale_dtype = first.scale_dtype
    scale_shape = grid(shape, opts.block)
    if not problems:
        def make_w(srcs, cuts=cuts, axis=axis):
            return cat([srcs[c.src].narrow(axis, c.lo, c.hi - c.lo) for c in cuts], axis)

        def make_s(srcs, cuts=cuts, axis=axis, b=b):
            return cat([srcs[specs[c.src].scale_key].narrow(axis, c.lo // b, -(-c.hi // b) - c.lo // b)
                         for c in cuts], axis)
        return Out(file, name, first.dtype, shape, make_w, (scale_dtype, scale_shape, make_s))
    if not opts.requant:
        raise ValueError("FP8 split not on a block boundary: " + problems[0] + ". " + opts.hint)
    if first.dtype != "F8_E4M3" or any(DTYPES[specs[c.src].scale_dtype] not in nx.SCALE_DTYPES for c in cuts):
        raise ValueError(f"{name}: needs requantization ({problems[0]}), which supports F8_E4M3 weights with "
                         f"F32/BF16/F8_E8M0 scales only, not {first.dtype} with {sorted(scale_dtypes)} scales")
    if DTYPES[scale_dtype] not in nx.SCALE_DTYPES:
        scale_dtype = "F32"
    fmt = "ue8m0" if (opts.pow2_scales or scale_dtype == "F8_E8M0") else "float"
    key = ("requant", file, name)

    def make_rq(srcs, cuts=cuts, axis=axis):
        from ..dispatch import dequant_fp8_block, quant_fp8_block

        parts = []
        for c in cuts:
            dq = srcs.get(("dequant", c.src))
            if dq is None:
                dq = srcs[("dequant", c.src)] = dequant_fp8_block(
                    srcs[c.src], srcs[specs[c.src].scale_key], block_size=opts.block, out_dtype=torch.float32)
            parts.append(dq.narrow(axis, c.lo, c.hi - c.lo))
        q, s = quant_fp8_block(cat(parts, axis).contiguous(), block_size=opts.block, scale_fmt=fmt,
                               scale_dtype=DTYPES[scale_dtype], amax_floor=opts.amax_epsilon)
        srcs[key] = s
        return q

    def make_rs(srcs):
        return srcs.pop(key)
    return Out(file, name, "F8_E4M3", shape, make_rq, (scale_dtype, scale_shape, make_rs), requant=True)


def specs_from_table(table: dict[str, tuple[str, tuple]], block, key=lambda n: n) -> tuple[
        dict[str, tuple[str, tuple]], dict[str, Spec]]:
    """Split a {name: (dtype, shape)} table into weights and their scales; checks FP8 weight/scale pairs."""
    weights, specs = {}, {}
    for name, (dtype, shape) in table.items():
        if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in table:
            continue
        weights[name] = (dtype, tuple(shape))
    for name, (dtype, shape) in weights.items():
        sname = name + SCALE_SUFFIX
        if sname in table:
            sdtype, sshape = table[sname][0], tuple(table[sname][1])
            if dtype not in FP8_DTYPES:
                raise ValueError(f"{sname} is a block scale of {name}, which is {dtype}, not FP8")
            if len(shape) != 2 or sshape != grid(shape, block):
                want = list(grid(shape, block)) if len(shape) == 2 else "a 2-D weight"
                raise ValueError(f"{sname} {list(sshape)}: expected {want} for the FP8 weight {name} {list(shape)} "
                                 f"with {block[0]}x{block[1]} blocks")
            specs[key(name)] = Spec(name, dtype, shape, key(sname), sdtype, sshape)
        else:
            if dtype in FP8_DTYPES:
                raise ValueError(f"{name} is {dtype} but {sname} (its block scales) is missing")
            specs[key(name)] = Spec(name, dtype, shape)
    return weights, specs


def scale_inv_name(name: str) -> str:
    return name + SCALE_SUFFIX


def job_of(sources: list[str], outs: list[Out], specs: dict[str, Spec]) -> ShardJob:
    srcs = list(dict.fromkeys(sources))
    scales = [specs[s].scale_key for s in srcs if specs[s].scale_key]
    job = ShardJob(tuple(srcs + scales))
    for o in outs:
        job.outputs.append(SliceOut(o.file, OutEntry(o.name, o.dtype, o.shape), o.make))
        if o.scale:
            job.outputs.append(SliceOut(o.file, OutEntry(scale_inv_name(o.name), o.scale[0], o.scale[1]), o.scale[2]))
    return job
