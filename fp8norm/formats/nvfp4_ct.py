"""NVFP4 in the compressed-tensors layout (`nvfp4-pack-quantized`): the NVFP4 bytes and scales named
`weight_packed`, `weight_scale`, `weight_global_scale` (1 / ModelOpt's scale_2), per module, fused 3D
experts per expert and projection."""

from dataclasses import dataclass

from . import _rules, compressed_tensors as ct
from .nvfp4 import FORMAT as NVFP4, GROUP, Nvfp4

CT_FORMAT = "nvfp4-pack-quantized"


@dataclass(frozen=True)
class CtNvfp4(Nvfp4):
    def detect(self, config, tensors):
        from ..kernels.numerics import fp8_block as nx

        return nx.DEFAULT_BLOCK_SIZE if ct.quantization_config_of(config).get("format") == CT_FORMAT else None

    def global_scaled_members(self, tensors):
        out = {}
        for n, i in tensors.items():
            if i.dtype == "U8" and n.endswith(".weight_packed"):
                m = n.removesuffix(".weight_packed")
                if m + ".weight_scale" in tensors and m + ".weight_global_scale" in tensors:
                    out[n] = (m + ".weight_scale", m + ".weight_global_scale", m + ".weight")
        return out

    def member_key(self, logical):
        return ct.module_of(logical)

    def output_key(self, stored):
        return ct.output_module(stored)

    def sources_of(self, st):
        return ct.split_sources(st)

    def source_parts(self, name, x):
        return ct.split_source(name, x)

    def stored_global_scale(self, g):
        import torch

        return torch.reciprocal(g.float()).reshape(g.shape[:-1])

    def scale_2(self, stored_global):
        import torch

        return torch.reciprocal(stored_global.float())

    @property
    def stores_scale_2(self):
        return False

    def config_beside(self, quant):
        return {}

    def kept_reason(self, name, shape):
        return ct.fused_3d_kept(name, shape)

    def outputs(self, name, shape, dtype="BF16"):
        from ..st_io import OutEntry

        modules = ct.output_modules(name, shape)
        rows = shape[-2] * (shape[0] if len(shape) == 3 else 1) // len(modules)
        return [e for m in modules for e in (OutEntry(f"{m}.weight_packed", "U8", (rows, shape[-1] // 2)),
                                             OutEntry(f"{m}.weight_scale", "F8_E4M3", (rows, shape[-1] // GROUP)),
                                             OutEntry(f"{m}.weight_global_scale", "F32", (1,)))]

    def encode(self, x, *, name="", src_scale_inv=None, src_block_size=(128, 128), rule=None, global_amax=None):
        """compressed-tensors stores 1 / scale_2, per module (fused experts split: the projections of an
        expert share its scale)."""
        import torch

        packed, wscale, wscale2 = super().encode(x, src_scale_inv=src_scale_inv, src_block_size=src_block_size,
                                                 global_amax=global_amax)
        inv = torch.reciprocal(wscale2).reshape(-1)
        modules = ct.output_modules(name, tuple(x.shape))
        per_expert = len(modules) // inv.numel()
        return [o.contiguous() for trio in zip(ct.split_source(name, packed), ct.split_source(name, wscale),
                                               inv.repeat_interleave(per_expert).split(1))
                for o in trio]

    def quantization_config(self, plan):
        weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": GROUP,
                   "symmetric": True, "dynamic": False}
        return ct.ct_config(CT_FORMAT, weights, None, plan)

    def extra_files(self, plan):
        return {}


FORMAT = CtNvfp4(**{**NVFP4.__dict__,
    "name": "nvfp4-ct", "summary": "NVFP4, compressed-tensors nvfp4-pack-quantized (Blackwell)",
    "layout": "compressed-tensors", "from_bf16": ("convert", "--to", "nvfp4-ct"),
    "from_fp8": ("convert", "--to", "nvfp4-ct"), "readers": ("compressed-tensors",),
    "config_rules": (_rules.compressed_tensors,), "detect_order": 0, "layout_label": "compressed-tensors",
    "extra_file_names": ()})
