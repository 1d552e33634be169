"""Block FP8 with power-of-two (ue8m0) scales, for Blackwell / DeepGEMM: the block layout of `fp8` with
each scale rounded up to a power of two before quantizing, `scale_fmt: ue8m0` in the config."""

from dataclasses import replace

from .fp8_block import FORMAT as FP8

FORMAT = replace(
    FP8, name="fp8-ue8m0", summary="block FP8 with power-of-two scales (B200 / DeepGEMM)",
    from_bf16=("quantize", "--to", "fp8", "--scale-fmt", "ue8m0"),
    from_fp8=("convert", "--to", "fp8", "--scale-fmt", "ue8m0"), floor_sqnr_db=30.0,
    aliases=(), library_scheme=None, detect_order=None, scale_fmt="ue8m0",
)
