"""FP8 with one scale per output row (compressed-tensors FP8_DYNAMIC, `float-quantized`, strategy
channel): `weight` e4m3, `weight_scale` fp32 [N, 1]; activations per token at run time. Rules:
fp8norm.kernels.numerics.fp8_channel; kernel: fp8norm.kernels.quant_fp8_channel."""

from dataclasses import dataclass

from . import _rules
from .compressed_tensors import Scheme


@dataclass(frozen=True)
class Fp8Channel(Scheme):
    def weight_args(self):
        """compressed-tensors 0.20's FP8_DYNAMIC preset."""
        return ({"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
                 "group_size": None},
                {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True,
                 "group_size": None})

    def expected_scale(self, shape):
        return (*shape[:-1], 1)

    def bad_scales(self, values):
        import torch

        return ~(torch.isfinite(values.float()) & (values > 0))

    def quantize(self, x, src_scale_inv, src_block_size, rule):
        import torch

        from .. import dispatch

        # bf16-valued scales stored as fp32: transformers (bf16 scale) and vLLM (fp32) read the same values
        q, scale = dispatch.quant_fp8_channel(x, scale_dtype=torch.bfloat16, src_scale_inv=src_scale_inv,
                                              src_block_size=src_block_size)
        return [q, scale.float()]

    def dequantize(self, stored, scale, out_dtype):
        from .. import dispatch

        return dispatch.dequant_fp8_channel(stored, scale, out_dtype=out_dtype)


FORMAT = Fp8Channel(
    name="fp8-channel", summary="FP8, one scale per row (compressed-tensors FP8_DYNAMIC)",
    element="e4m3", scale_block=(1, None), elements_per_byte=1, layout="compressed-tensors",
    from_bf16=("quantize", "--to", "fp8-channel"), from_fp8=("convert", "--to", "fp8-channel"),
    floor_sqnr_db=31.5, readers=("compressed-tensors", "transformers"), config_rules=(_rules.compressed_tensors,),
    detect_order=20, scale_suffix="_scale", verify_key="fp8-channel", weight_label="FP8 per-channel",
    ct_format="float-quantized", scale_dtypes=("F32", "BF16", "F16"),
)
