"""The block grid of block FP8 without torch: what planning needs (a plan is made without importing
torch, so `fp8norm repack` never imports it). fp8_block re-exports these."""

from __future__ import annotations

DEFAULT_BLOCK_SIZE = (128, 128)
DEFAULT_AMAX_FLOOR = 1e-4


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def scale_inv_shape(shape: tuple[int, ...], block_size: tuple[int, int]) -> tuple[int, ...]:
    """`[..., M, N]` -> `[..., ceil(M/bm), ceil(N/bn)]`."""
    *lead, m, n = shape
    return (*lead, ceil_div(m, block_size[0]), ceil_div(n, block_size[1]))
