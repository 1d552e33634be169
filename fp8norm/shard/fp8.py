"""The cut / join / requantize engine of the model-parallel layouts, for plain and scaled weights.

A destination tensor is the concatenation of cuts of source tensors along one axis. Plain tensors are
cut and joined as they are. A scaled weight is stored as a Format says: block FP8 (`X` + `X_scale_inv`,
weight_block_size blocks), or the compressed-tensors schemes fp8norm writes: fp8-channel (`X` +
`X_scale` [N, 1]), mxfp8 (`X` + `X_scale` E8M0 [N, K/32]), mxfp4 (`X_packed` [N, K/2] + `X_scale`).
Its scale has one block size per axis, None meaning the whole axis. Planning works in logical
coordinates (mxfp4: unpacked columns); the engine maps each cut to storage (mxfp4: bytes, column/2)
and to scale coordinates, and carries weight bytes and their scale tiles together when every cut is
on the scale grid: a whole-axis block is never cut (each piece keeps the whole scale, and a join
takes it from the first piece after checking the pieces agree); a 1-row block is cut anywhere.
Off the grid, block FP8 is requantized with `requant` (each source dequantized once per job, the
piece quantized again), otherwise a ValueError names the rows/columns that miss the grid; MX and
per-channel weights are never requantized. Used by the Megatron-Core mapping and the DeepSeek layout.
"""

from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.numerics import fp8_block as nx
from .. import formats
from ..formats.compressed_tensors import LAYOUT as CT_LAYOUT, Scheme
from ..formats.fp8_block import BlockFp8
from ..st_io import DTYPES, FP8_DTYPES, OutEntry
from ..engine import Job
from .jobs import SliceOut, shard_job


@dataclass(frozen=True)
class Format:
    """How a checkpoint stores its scaled weights."""
    scheme: str
    weight_suffix: str  # stored weight = logical name + this
    scale_suffix: str  # its scale = logical name + this
    block: tuple  # scale block per axis (rows, columns); None: the whole axis
    weight_dtypes: tuple
    pack: int = 1  # logical columns per stored element (mxfp4: two e2m1 codes a byte)

    @property
    def requantizable(self) -> bool:  # block FP8, in either layout
        return isinstance(SHARDED[self.scheme], BlockFp8)

    def scale_shape(self, shape: tuple) -> tuple:
        return tuple(1 if b is None else -(-n // b) for n, b in zip(shape, self.block))


# The formats shard splits, by the name its layout files record (`scheme`): block FP8 in either layout
# and the compressed-tensors schemes; every source format without a refusal but bf16 (no scales)
SHARDED = {f.kind: f for f in formats.FORMATS.values()
           if f.detect_order is not None and f.shard_refusal is None and not f.dense_dtype}


def storage_format(root, cfg: dict, tensors: dict, block=nx.DEFAULT_BLOCK_SIZE) -> Format:
    """The Format of the checkpoint in `root`, from its config.json and tensors as convert reads them
    (convert.detect_source): a compressed-tensors layout, else block FP8 with `block` (its
    weight_block_size). NVFP4 and other layouts are refused in one line."""
    from ..convert import detect_source

    try:
        source = detect_source(tensors, cfg or {})
    except ValueError as e:
        schemes = (f.name for f in SHARDED.values() if isinstance(f, Scheme))
        raise ValueError(f"{root}: {e}; shard splits bf16, block FP8 (either layout), "
                         f"{', '.join(schemes)}") from None
    if refusal := source.format.shard_refusal:
        raise ValueError(f"{root}: {source.format.weight_label} checkpoint: {refusal}")
    if source.format.layout == CT_LAYOUT:
        return scheme_format(source.kind, source.block_size)
    return scheme_format(formats.get("fp8").kind, block)


def scheme_format(scheme: str, block=nx.DEFAULT_BLOCK_SIZE) -> Format:
    """How a checkpoint in `scheme` (a SHARDED name) stores its weights: block FP8 on `block` tiles, a
    compressed-tensors scheme on its own scale grid."""
    if scheme not in SHARDED:
        raise ValueError(f"weight format {scheme!r}: expected one of {', '.join(SHARDED)}")
    f = SHARDED[scheme]
    if isinstance(f, Scheme):
        return Format(scheme, f.elements_suffix.removeprefix(".weight"), f.scale_suffix, f.scale_block,
                      (f.weight_dtype,), pack=f.elements_per_byte)
    return Format(scheme, "", f.scale_suffix, tuple(block), FP8_DTYPES)


@dataclass(frozen=True)
class Spec:
    """A source tensor as the planner sees it: a plain tensor, or a scaled weight (fmt set)."""
    name: str  # display name (the stored tensor's)
    dtype: str  # stored dtype
    shape: tuple  # logical shape (mxfp4: unpacked columns)
    key: str  # source key of the stored tensor
    fmt: Format | None = None
    scale_key: str | None = None
    scale_dtype: str | None = None
    scale_shape: tuple | None = None

    def stored(self, shape: tuple) -> tuple:
        return (*shape[:-1], shape[-1] // self.fmt.pack) if self.fmt else tuple(shape)

    def describe(self) -> str:
        packed = self.fmt and self.fmt.pack > 1
        return (f"{self.name} {self.dtype} {list(self.stored(self.shape))}"
                + (f" ({self.shape[-1]} columns, {self.fmt.pack} a byte)" if packed else ""))


@dataclass(frozen=True)
class Cut:
    src: str  # key of the source Spec
    lo: int
    hi: int
    at: int
    axis: int


@dataclass
class Out:
    """A planned destination tensor: its stored tensors (the weight, then its scale if scaled)."""
    file: str | None
    name: str  # logical name
    tensors: list[tuple[OutEntry, Callable]]
    requant: bool = False

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e, _ in self.tensors)


@dataclass
class QuantOpts:
    requant: bool
    amax_floor: float
    scale_fmt: str | None  # ue8m0: power-of-two scales; None/float: float, or ue8m0 where the source's are E8M0
    hint: str  # what to do about a misaligned block-FP8 piece


def quant_opts(requant: bool, amax_floor: float | None, scale_fmt: str | None, hint: str) -> QuantOpts:
    """The requantization settings of a shard/unshard run, checked (None: the defaults)."""
    amax_floor = nx.DEFAULT_AMAX_FLOOR if amax_floor is None else amax_floor
    if not (math.isfinite(amax_floor) and amax_floor > 0):
        raise ValueError(f"amax_floor (--amax-floor) must be a finite number > 0, got {amax_floor}")
    if scale_fmt not in (None, "float", "ue8m0"):
        raise ValueError(f"scale_fmt (--scale-fmt) must be float or ue8m0, got {scale_fmt!r}")
    return QuantOpts(requant, amax_floor, scale_fmt, hint)


def cat(parts: list[torch.Tensor], axis: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, axis)


def plan_out(file: str | None, name: str, cuts: list[Cut], specs: dict[str, Spec], rule: str,
             opts: QuantOpts) -> Out:
    cuts = sorted(cuts, key=lambda c: c.at)
    axis = cuts[0].axis
    first = specs[cuts[0].src]
    fmt = first.fmt
    pos = 0
    for c in cuts:
        if c.at != pos or c.axis != axis:
            raise RuntimeError(f"internal: {name}: pieces do not tile the tensor ({cuts})")
        pos += c.hi - c.lo
        sp = specs[c.src]
        if (sp.dtype, sp.fmt, len(sp.shape)) != (first.dtype, fmt, len(first.shape)) or any(
                a != b for d, (a, b) in enumerate(zip(sp.shape, first.shape)) if d != axis):
            raise ValueError(f"{name}: joins {first.describe()} and {sp.describe()} along dim {axis}; {rule}, so they "
                             "must have the same dtype, the same scales (or none) and the same other dims")
    shape = tuple(pos if d == axis else n for d, n in enumerate(first.shape))
    pack = fmt.pack if fmt and axis == len(shape) - 1 else 1

    def make_w(srcs):
        return cat([srcs[specs[c.src].key].narrow(axis, c.lo // pack, (c.hi - c.lo) // pack) for c in cuts], axis)
    entry = OutEntry(name + (fmt.weight_suffix if fmt else ""), first.dtype, first.stored(shape))
    if fmt is None:
        return Out(file, name, [(entry, make_w)])

    # Scaled: carry bytes and scale tiles when every cut is on the scale grid, else requantize (block FP8).
    b = fmt.block[axis]
    problems = []
    for idx, c in enumerate(cuts):
        sp = specs[c.src]
        last = idx == len(cuts) - 1 and c.hi == sp.shape[axis]
        if b and (c.lo % b or c.at % b or ((c.hi - c.lo) % b and not last)):
            unit = "rows" if axis == 0 else "columns"
            grid_name = "FP8 block" if fmt.requantizable else f"{fmt.scheme} scale"
            problems.append(f"{sp.describe()}: {rule}; its {unit} [{c.lo}, {c.hi}) "
                            f"go to {unit} [{c.at}, {c.at + c.hi - c.lo}) of {name}, which is not on the "
                            f"{b}-{unit[:-1]} {grid_name} grid")
    if problems and not fmt.requantizable:
        raise ValueError(f"{fmt.scheme} split not on its scale grid: {problems[0]}. {fmt.scheme} weights are not "
                         f"requantized: choose a parallel size for which every piece is a multiple of {b} columns")
    if problems and not opts.requant:
        raise ValueError("FP8 split not on a block boundary: " + problems[0] + ". " + opts.hint)
    for sp in {specs[c.src] for c in cuts}:
        if sp.scale_shape != fmt.scale_shape(sp.shape):
            raise ValueError(f"{sp.scale_key} {list(sp.scale_shape)}: expected {list(fmt.scale_shape(sp.shape))} for "
                             f"the {fmt.scheme} weight {sp.describe()} (scale blocks "
                             f"{' x '.join(str(b or 'all') for b in fmt.block)})")
    scale_dtypes = {specs[c.src].scale_dtype for c in cuts}
    if len(scale_dtypes) > 1 and not problems:
        raise ValueError(f"{name}: joins scaled tensors whose scales have different dtypes {sorted(scale_dtypes)}")
    scale_dtype, scale_name, scale_shape = first.scale_dtype, name + fmt.scale_suffix, fmt.scale_shape(shape)
    if not problems:
        def make_s(srcs):
            parts = [srcs[specs[c.src].scale_key] for c in cuts]
            if b is None:  # every piece holds the whole scale along this axis: they must agree
                if any(not torch.equal(p, parts[0]) for p in parts[1:]):
                    pieces = [specs[c.src].name.removesuffix(fmt.weight_suffix) + fmt.scale_suffix for c in cuts]
                    raise ValueError(f"{scale_name}: its pieces {pieces} differ, so they cannot be joined")
                return parts[0]
            return cat([p.narrow(axis, c.lo // b, -(-c.hi // b) - c.lo // b) for p, c in zip(parts, cuts)], axis)
        return Out(file, name, [(entry, make_w), (OutEntry(scale_name, scale_dtype, scale_shape), make_s)])
    if first.dtype != "F8_E4M3" or any(DTYPES[specs[c.src].scale_dtype] not in nx.SCALE_DTYPES for c in cuts):
        raise ValueError(f"{name}: needs requantization ({problems[0]}), which supports F8_E4M3 weights with "
                         f"F32/BF16/F8_E8M0 scales only, not {first.dtype} with {sorted(scale_dtypes)} scales")
    if DTYPES[scale_dtype] not in nx.SCALE_DTYPES:
        scale_dtype = "F32"
    sfmt = "ue8m0" if (opts.scale_fmt == "ue8m0" or scale_dtype == "F8_E8M0") else "float"
    key = ("requant", file, name)

    def make_rq(srcs):
        from ..dispatch import dequant_fp8_block, quant_fp8_block

        parts = []
        for c in cuts:
            dq = srcs.get(("dequant", c.src))
            if dq is None:
                sp = specs[c.src]
                dq = srcs[("dequant", c.src)] = dequant_fp8_block(
                    srcs[sp.key], srcs[sp.scale_key], block_size=fmt.block, out_dtype=torch.float32)
            parts.append(dq.narrow(axis, c.lo, c.hi - c.lo))
        q, s = quant_fp8_block(cat(parts, axis).contiguous(), block_size=fmt.block, scale_fmt=sfmt,
                               scale_dtype=DTYPES[scale_dtype], amax_floor=opts.amax_floor)
        srcs[key] = s
        return q

    def make_rs(srcs):
        return srcs.pop(key)
    return Out(file, name, [(entry, make_rq),
                            (OutEntry(scale_name, scale_dtype, scale_shape), make_rs)], requant=True)


def specs_from_table(table: dict[str, tuple[str, tuple]], fmt: Format) -> tuple[
        dict[str, tuple[str, tuple]], dict[str, Spec]]:
    """Split a {key: (dtype, stored shape)} table into logical weights {key: (dtype, logical shape)} and
    their Specs, pairing each weight (logical key + fmt.weight_suffix) with its scale (+ fmt.scale_suffix)
    and checking the pair; a scale's weight is keyed by its logical name (`X.weight`, even when stored
    as `X.weight_packed`)."""
    ws, ss = fmt.weight_suffix, fmt.scale_suffix
    weights, specs = {}, {}
    for name, (dtype, shape) in table.items():
        if name.endswith(ss):
            if name[:-len(ss)] + ws in table:
                continue  # a scale: taken with its weight
            if name[:-len(ss)].endswith("weight"):
                raise ValueError(f"{name} is a {fmt.scheme} scale, but its weight {name[:-len(ss)] + ws} is missing")
        base = name[:-len(ws)] if ws and name.endswith(ws) else name
        sname = base + ss
        if sname not in table or base + ws != name:
            if dtype in FP8_DTYPES:
                raise ValueError(f"{name} is {dtype} but {sname} (its scales) is missing")
            weights[name], specs[name] = (dtype, tuple(shape)), Spec(name, dtype, tuple(shape), name)
            continue
        sdtype, sshape = table[sname][0], tuple(table[sname][1])
        if dtype not in fmt.weight_dtypes or len(shape) != 2:
            raise ValueError(f"{sname} is a {fmt.scheme} scale of {name}, which is {dtype} {list(shape)}, not a 2-D "
                             f"{'/'.join(fmt.weight_dtypes)} weight")
        logical = (*shape[:-1], shape[-1] * fmt.pack)
        weights[base] = (dtype, logical)
        specs[base] = Spec(name, dtype, logical, name, fmt, sname, sdtype, sshape)
    return weights, specs


def check_scales(ckpt, specs: dict[str, Spec]) -> None:
    """Every scale a shard / unshard run carries or requantizes from, checked as convert checks its
    sources (its format's check_sources: finite and > 0, no E8M0 NaN code), before
    anything is written: a ValueError of one line naming the file and tensor."""
    scaled = [sp for sp in specs.values() if sp.fmt is not None]
    if not scaled:
        return
    fmt, pairs = scaled[0].fmt, {sp.key: sp.scale_key for sp in scaled}
    SHARDED[fmt.scheme].check_sources(ckpt, pairs, fmt.block)


def job_of(sources: list[str], outs: list[Out], specs: dict[str, Spec]) -> Job:
    """One job reading the stored tensors (and scales) of the `sources` Specs and writing `outs`."""
    srcs = [specs[s] for s in dict.fromkeys(sources)]
    return shard_job([s.key for s in srcs] + [s.scale_key for s in srcs if s.scale_key],
                     [SliceOut(o.file, entry, make) for o in outs for entry, make in o.tensors])
