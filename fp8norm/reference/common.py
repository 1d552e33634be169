"""The chunked walk every torch twin shares: whole row blocks (about CHUNK_ELEMS elements) at a time, one
reused fp32 buffer, exact e4m3 -> fp32, and the expansion of per-block scales to their elements."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

# ~4 MB of fp32 per chunk: fits the caches of one CPU core pair, large enough to amortise dispatch.
CHUNK_ELEMS = 1 << 20


def row_chunks(m: int, n: int, bm: int) -> Iterator[tuple[int, int, int]]:
    """(first row block, number of row blocks k, rows per block) covering m rows.

    Whole row blocks are grouped k at a time; a ragged last block comes alone, so every chunk views
    as [k, rows_per_block, n].
    """
    full = m // bm
    k = max(1, CHUNK_ELEMS // max(1, bm * n))
    for b0 in range(0, full, k):
        yield b0, min(k, full - b0), bm
    if m % bm:
        yield full, 1, m % bm


def block_amax_cols(t: torch.Tensor, bn: int) -> torch.Tensor:
    """[k, n] -> [k, ceil(n/bn)]: max over column blocks, the ragged tail as its own block."""
    n = t.shape[1]
    full = n // bn * bn
    parts = []
    if full:
        parts.append(t[:, :full].unflatten(1, (full // bn, bn)).amax(2))
    if full < n:
        parts.append(t[:, full:].amax(1, keepdim=True))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0]


def expand_cols(t: torch.Tensor, bn: int, n: int) -> torch.Tensor:
    """[k, ceil(n/bn)] -> [k, n]: each block's value repeated over its columns."""
    return t.repeat_interleave(bn, dim=1)[:, :n]


class ChunkBuffer:
    """One fp32 working buffer reused for every chunk (no allocation or page faults per chunk)."""

    def __init__(self, device):
        self.device = device
        self.data = torch.empty(0, dtype=torch.float32, device=device)

    def load(self, rows2d: torch.Tensor, k: int, rows: int) -> torch.Tensor:
        """Copy a [k*rows, n] slice (any dtype, any strides) into the buffer as fp32 [k, rows, n]."""
        numel = rows2d.numel()
        if self.data.numel() < numel:
            self.data = torch.empty(numel, dtype=torch.float32, device=self.device)
        chunk = self.data[:numel].view(rows2d.shape)
        if rows2d.dtype == torch.float8_e4m3fn:
            e4m3_to_float32(rows2d, out=chunk)
        else:
            chunk.copy_(rows2d)
        return chunk.view(k, rows, rows2d.shape[1])


@functools.cache
def _e4m3_values(device) -> torch.Tensor:
    """The fp32 value of each of the 256 e4m3 codes (NaN for 0x7F and 0xFF): torch's own cast, once."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).float()


# Codes looked up at a time: their int32 indices (256 KiB) stay below the pinned mmap threshold
# (fp8norm._memory), so they come from the heap; 1 MiB of indices, freshly mapped each time, made the
# lookup 3-6x slower.
_LOOKUP_PIECE = 1 << 16


def e4m3_to_float32(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Exact e4m3 -> fp32 into `out` (q's shape, contiguous): a lookup of each code's value (NaN codes
    included) by int32 index, ~1 ns an element on one core here, against 3.3 for torch's fp8 cast and
    4.7 for the bit placement into bf16 it replaces."""
    values = _e4m3_values(q.device)
    codes, flat = q.view(torch.uint8).reshape(-1), out.view(-1)
    for i in range(0, codes.numel(), _LOOKUP_PIECE):
        torch.index_select(values, 0, codes[i:i + _LOOKUP_PIECE].int(), out=flat[i:i + _LOOKUP_PIECE])
    return out


def matrices(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield matching 2D slices: the tensors themselves, or expert e of each for 3D inputs."""
    if tensors[0].dim() == 2:
        yield tensors
    else:
        for e in range(tensors[0].shape[0]):
            yield tuple(t[e] for t in tensors)


def row_ranges(m: int, n: int):
    """(r0, r1) row ranges of about CHUNK_ELEMS elements covering m rows of width n."""
    step = max(1, CHUNK_ELEMS // max(1, n))
    for r0 in range(0, m, step):
        yield r0, min(m, r0 + step)


def src_scale_rows(s2: torch.Tensor, r0: int, r1: int, block_size, n: int) -> torch.Tensor:
    """Block scales `[ceil(M/bm), ceil(N/bn)]` expanded to the elements of rows r0..r1: `[r1-r0, n]`."""
    bm, bn = block_size
    b0 = r0 // bm
    rows = s2[b0:-(-r1 // bm)].repeat_interleave(bm, 0)[r0 - b0 * bm:r1 - b0 * bm]
    return rows.repeat_interleave(bn, 1)[:, :n]
