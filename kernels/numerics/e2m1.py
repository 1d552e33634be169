"""E2M1 (FP4) elements, shared by NVFP4 and MXFP4: the code table, round-to-nearest-even encoding and
the two-codes-a-byte packing (element 2k in the low nibble).

A code is sign (bit 3) and magnitude index 0..7 = {0, 0.5, 1, 1.5, 2, 3, 4, 6}. The bounds and the
`+1` on 0.75, 1.75 and 3.5 are round-to-nearest with ties to even codes; |q| > 5 saturates to 6.
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0
# Decision bounds between neighbouring magnitudes, and whether a value exactly on a bound goes up
# (to the even code).
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_TIE_UP = (False, True, False, True, False, True, False)
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_table(device=None) -> torch.Tensor:
    """fp32 value of each of the 16 codes (code 8 is -0.0)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """fp32 -> uint8 E2M1 codes (0..15): nearest magnitude, ties to even, saturating at 6."""
    a = q.abs()
    code = torch.zeros(q.shape, dtype=torch.uint8, device=q.device)
    for bound, up in zip(E2M1_BOUNDS, E2M1_TIE_UP):
        code += (a >= bound) if up else (a > bound)
    code |= (q < 0).to(torch.uint8) << 3
    return code


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes `[..., N]` -> bytes `[..., N/2]`, element 2k in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """bytes `[..., N/2]` -> uint8 codes `[..., N]`."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
