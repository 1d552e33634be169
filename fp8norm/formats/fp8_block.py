"""Block FP8, DeepSeek / DeepGEMM / transformers layout: e4m3 weights, one float scale per 128x128 tile
stored as `<name>_scale_inv` (fp32 by default), `quantization_config.quant_method: fp8` with
`weight_block_size`. Rules: fp8norm.kernels.numerics.fp8_block; kernel: fp8norm.kernels.quant_fp8_block."""

from . import Format, _rules

FORMAT = Format(
    name="fp8", summary="block FP8, 128x128 float scales (DeepSeek / transformers layout)",
    element="e4m3", scale_block=(128, 128), elements_per_byte=1, layout="hf-fp8",
    from_bf16=("quantize", "--to", "fp8"), from_fp8=None,  # block FP8 is the source itself
    floor_sqnr_db=31.5, readers=("transformers",), config_rules=(_rules.hf_fp8,),
    aliases=("fp8-block",), library_scheme="fp8-block",
)
