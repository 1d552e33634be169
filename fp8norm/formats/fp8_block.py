"""Block FP8, DeepSeek / DeepGEMM / transformers layout: e4m3 weights, one float scale per 128x128 tile
stored as `<name>_scale_inv` (fp32 by default), `quantization_config.quant_method: fp8` with
`weight_block_size`. Rules: fp8norm.kernels.numerics.fp8_block; kernel: fp8norm.kernels.quant_fp8_block.
`BlockFp8` is the behaviour of every block FP8 format (fp8, fp8-ue8m0, fp8-ct)."""

from dataclasses import dataclass

from . import Format, _rules


@dataclass(frozen=True)
class BlockFp8(Format):
    scale_fmt: str = "float"  # ue8m0: every scale a power of two

    @property
    def requantizes_fp8(self) -> bool:
        return self.scale_fmt != "float"

    def detect(self, config, tensors):
        from ..kernels.numerics import fp8_block as nx
        from ..st_io import FP8_DTYPES

        if not any(i.dtype in FP8_DTYPES for i in tensors.values()):
            return None
        return (config.get("quantization_config") or {}).get("weight_block_size") or nx.DEFAULT_BLOCK_SIZE

    def refuse_source(self, src, source):
        return f"{src}: is already block FP8 in the DeepSeek/transformers layout" if source is self else None

    def convert_decision(self, name, info, scale, candidate, source):
        from ..classify import Decision

        if not scale:
            return None
        if self.scale_fmt != "float":  # rounded anew to power-of-two scales where not one already
            return Decision.UE8M0, f"fp8->{self.name}"
        return Decision.RELABEL, f"fp8-layout->{self.name}"

    def quantization_config(self, plan):
        bm, bn = plan.source_format.block_size
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [bm, bn],
              "modules_to_not_convert": plan.kept_linear_modules()}
        if self.scale_fmt != "float":
            qc["scale_fmt"] = self.scale_fmt
        return qc


FORMAT = BlockFp8(
    name="fp8", summary="block FP8, 128x128 float scales (DeepSeek / transformers layout)",
    element="e4m3", scale_block=(128, 128), elements_per_byte=1, layout="hf-fp8",
    from_bf16=("quantize", "--to", "fp8"), from_fp8=None,  # block FP8 is the source itself
    floor_sqnr_db=31.5, readers=("transformers",), config_rules=(_rules.hf_fp8,),
    aliases=("fp8-block",), library_scheme="fp8-block", detect_order=40,
)
