"""Dense bf16: what a quantized checkpoint dequantizes back to (`convert --to bf16`); no
quantization_config. `fp16` is the same with float16 weights."""

from . import Format, _rules

FORMAT = Format(
    name="bf16", summary="dense bf16 (dequantized)",
    element="bf16", scale_block=(), elements_per_byte=1, layout="dense",
    from_bf16=None, from_fp8=("convert", "--to", "bf16"),  # bf16 is a source itself
    floor_sqnr_db=None, readers=("transformers",), config_rules=(_rules.no_quantization,),
)
