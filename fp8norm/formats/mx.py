"""The OCP MX schemes (mxfp8, mxfp4) in compressed-tensors layouts: one E8M0 scale (uint8) per 32
elements along a row, weight-only (activations stay in the model dtype: MXFP8A16 / MXFP4A16). Weights
whose input dim is not a multiple of 32 stay as they are. Rules: fp8norm.kernels.numerics.mx; kernel:
fp8norm.kernels.quant_mx."""

from dataclasses import dataclass

from .compressed_tensors import Scheme

UNALIGNED_KEPT = "mx:unaligned-kept"


def _block() -> int:
    from ..kernels.numerics import mx  # torch: loaded when a command runs, not as the CLI starts

    return mx.MX_BLOCK


@dataclass(frozen=True)
class Mx(Scheme):
    takes_mx_rule = True
    saturates = True

    def weight_args(self):
        """compressed-tensors 0.20's MXFP8A16 / MXFP4A16 presets."""
        return ({"num_bits": 8 // self.elements_per_byte, "type": "float", "strategy": "group",
                 "group_size": _block(), "symmetric": True, "dynamic": False, "scale_dtype": "torch.uint8",
                 "zp_dtype": "torch.uint8"}, None)

    def matches(self, qc):
        return qc.get("format") == self.ct_format

    def expected_scale(self, shape):
        return (*shape[:-1], shape[-1] * self.elements_per_byte // _block())

    def fits(self, shape):
        return shape[-1] * self.elements_per_byte % _block() == 0

    def bad_scales(self, values):
        from ..kernels.numerics import mx

        return values == mx.E8M0_NAN

    def kept_reason(self, name, shape):
        return super().kept_reason(name, shape) or (UNALIGNED_KEPT if shape[-1] % _block() else None)

    def mx_rule(self, rule, spelled):
        from ..kernels.numerics import mx

        return mx.check_rule(rule or mx.DEFAULT_RULE)

    def quantize(self, x, src_scale_inv, src_block_size, rule):
        from .. import dispatch
        from ..kernels.numerics import mx

        return list(dispatch.quant_mx(x, fmt=self.name, rule=rule or mx.DEFAULT_RULE, src_scale_inv=src_scale_inv,
                                      src_block_size=src_block_size))

    def dequantize(self, stored, scale, out_dtype):
        from .. import dispatch

        return dispatch.dequant_mx(stored, scale, fmt=self.name, out_dtype=out_dtype)
