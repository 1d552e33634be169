"""NVFP4, ModelOpt layout: E2M1 elements packed two a byte, an e4m3 scale per 16 and an fp32
`weight_scale_2` per tensor (hf_quant_config.json and `quant_method: modelopt`). Rules:
fp8norm.kernels.numerics.nvfp4; kernel: fp8norm.kernels.quant_nvfp4."""

from . import Format

FORMAT = Format(
    name="nvfp4", summary="NVFP4, ModelOpt layout (Blackwell)",
    element="e2m1", scale_block=(1, 16), elements_per_byte=2, layout="modelopt",
    from_bf16=("convert", "--to", "nvfp4"), from_fp8=("convert", "--to", "nvfp4"),
    floor_sqnr_db=20.5, shard_refusal="NVFP4",
)
