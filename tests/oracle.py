"""A tiny independent oracle for block FP8, written straight from DeepGEMM's `per_block_cast_to_fp8`:
pad to whole tiles, amax per tile, sf = amax/448 (ceil to a power of two for ue8m0), x * (1/sf),
saturating cast. Deliberately shares no code with fp8norm."""

import torch


def _pad_tiles(x2, bm, bn):
    m, n = x2.shape
    padded = torch.zeros((-(-m // bm) * bm, -(-n // bn) * bn), dtype=torch.float32)
    padded[:m, :n] = x2.float()
    return padded.view(padded.shape[0] // bm, bm, padded.shape[1] // bn, bn)


def ceil_pow2(sf):
    mant, exp = torch.frexp(sf)  # sf = mant * 2^exp, mant in [0.5, 1)
    return torch.where(mant == 0.5, sf, torch.ldexp(torch.ones_like(sf), exp))


def ceil_bf16(sf):
    b = sf.to(torch.bfloat16)
    up = torch.nextafter(b, torch.full_like(b, float("inf")))
    return torch.where(b.float() < sf, up, b).float()


def oracle_scale(x2, bm=128, bn=128, scale_fmt="float", scale_dtype=torch.float32, amax_floor=1e-4):
    amax = _pad_tiles(x2, bm, bn).abs().amax(dim=(1, 3)).clamp(min=amax_floor)
    sf = amax / 448.0
    if scale_fmt == "ue8m0":
        return ceil_pow2(sf)
    return ceil_bf16(sf) if scale_dtype == torch.bfloat16 else sf


def oracle_quant(x, block_size=(128, 128), scale_fmt="float", scale_dtype=torch.float32,
                 amax_floor=1e-4, scale_inv=None):
    """Returns (q as uint8 bytes, fp32 scales) for 2D or 3D x."""
    bm, bn = block_size
    xs = [x] if x.dim() == 2 else list(x)
    given = None if scale_inv is None else ([scale_inv] if x.dim() == 2 else list(scale_inv))
    qs, sfs = [], []
    for i, x2 in enumerate(xs):
        m, n = x2.shape
        sf = oracle_scale(x2, bm, bn, scale_fmt, scale_dtype, amax_floor) if given is None else given[i].float()
        v = _pad_tiles(x2, bm, bn) * (1.0 / sf[:, None, :, None])
        q = v.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(-1, v.shape[2] * bn)[:m, :n]
        qs.append(q.view(torch.uint8))
        sfs.append(sf)
    if x.dim() == 2:
        return qs[0], sfs[0]
    return torch.stack(qs), torch.stack(sfs)


def oracle_dequant(q, scale_inv, block_size=(128, 128), out_dtype=torch.bfloat16):
    bm, bn = block_size
    m, n = q.shape[-2:]
    s = scale_inv.float().repeat_interleave(bm, -2).repeat_interleave(bn, -1)[..., :m, :n]
    return (q.float() * s).to(out_dtype)


def e4m3_values():
    """All 256 e4m3 codes as (code, value) with NaNs dropped: the grid, from the bytes themselves."""
    codes = torch.arange(256, dtype=torch.uint8)
    vals = codes.view(torch.float8_e4m3fn).float()
    keep = ~torch.isnan(vals)
    return codes[keep], vals[keep]
