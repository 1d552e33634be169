"""NVFP4, ModelOpt layout: E2M1 elements packed two a byte, an e4m3 scale per 16 and an fp32
`weight_scale_2` per tensor (hf_quant_config.json and `quant_method: modelopt`). Rules:
fp8norm.kernels.numerics.nvfp4; kernel: fp8norm.kernels.quant_nvfp4. `Nvfp4` is the behaviour of
both NVFP4 layouts (nvfp4_ct.py holds the compressed-tensors one).

q/k/v, gate/up and w1/w3 of one module share one global scale (engines fuse them); a fused 3D expert
tensor gets one global scale per expert. Weights whose input dimension is not a multiple of 16 are an
error naming them, or stay as they are with `keep_unaligned`. NVFP4 checkpoints convert back to
bf16/fp16 only."""

import json
import math
from dataclasses import dataclass

from . import Format, Member

GROUP = 16  # elements per e4m3 group scale (fp8norm.kernels.numerics.nvfp4)
HF_QUANT_CONFIG = "hf_quant_config.json"
# Weight-only NVFP4 (no `input_scale`: activations stay bf16/fp16), as ModelOpt names it
# (QUANTIZATION_W4A16_NVFP4 in modelopt/torch/export/model_config.py) and vLLM serves it
# (ModelOptNvFp4Config: "W4A16_NVFP4" -> the Marlin W4A16 linear method). "NVFP4" declares W4A4, whose
# input scales these files do not hold.
MODELOPT_QUANT_ALGO = "W4A16_NVFP4"


def modelopt_exclusions(plan) -> list[str]:
    """The linears left unquantized, lm_head always among them unless quantized (tied embeddings have no
    lm_head.weight, but the model has the Linear). A name that is a substring of a quantized module's
    (vLLM also excludes by substring) is written as a one-name wildcard (`mlp.gat[e]`), which matches
    only itself."""
    from ..classify import Decision
    from .compressed_tensors import module_of

    kept = plan.kept_linear_modules()
    quantized = {module_of(t.name) for t in plan.tensors if t.decision == Decision.NVFP4}
    if "lm_head" not in quantized and "lm_head" not in kept:
        kept.append("lm_head")
    fused = {m.rsplit(".", 1)[0] + "." + f for m in quantized for f in ("qkv_proj", "gate_up_proj")}
    return sorted(k if not any(k in q for q in quantized | fused) else f"{k[:-1]}[{k[-1]}]" for k in kept)


def modelopt_quantization(plan) -> dict:
    """hf_quant_config.json's `quantization`: vLLM requires group_size, kv_cache_quant_algo and
    exclude_modules there."""
    return {"quant_algo": MODELOPT_QUANT_ALGO, "group_size": GROUP, "kv_cache_quant_algo": None,
            "exclude_modules": modelopt_exclusions(plan)}


def modelopt_config_json(plan) -> dict:
    """config.json's flat `quantization_config` of a ModelOpt NVFP4 output: exclusions under `ignore`,
    the key vLLM reads in this form (`exclude_modules` only under hf_quant_config.json's `quantization`)."""
    return {"quant_method": "modelopt", "quant_algo": MODELOPT_QUANT_ALGO, "group_size": GROUP,
            "kv_cache_scheme": None, "ignore": modelopt_exclusions(plan)}


@dataclass(frozen=True)
class Nvfp4(Format):
    layout_label: str = "ModelOpt"

    quantizes_anew = True
    needs_global_amax = True
    unaligned_error_rule = "nvfp4:unaligned-kept"
    per_module = True
    tensors_per_member = 3
    saturates = True
    ties_to_even = True  # the quotient is the IEEE fp32 x / scale the kernel and its twin both compute
    keeps_scaled_fp8 = True  # an FP8 source's weights it does not round keep their `_scale_inv`

    def detect(self, config, tensors):
        from ..kernels.numerics import fp8_block as nx

        qc = config.get("quantization_config") or {}
        if qc.get("quant_method") == "modelopt" or any(n.endswith("_scale_2") for n in tensors):
            return nx.DEFAULT_BLOCK_SIZE  # of the block FP8 weights kept beside the NVFP4 ones
        return None

    def global_scaled_members(self, tensors):
        return {n: (n + "_scale", n + "_scale_2", n) for n, i in tensors.items()
                if i.dtype == "U8" and n + "_scale" in tensors and n + "_scale_2" in tensors}

    def member_key(self, logical: str) -> str:
        """What verify names a member by: ModelOpt's weight as stored."""
        return logical

    def stored_global_scale(self, g):
        """scale_2 as the quantizer formed it (ModelOpt stores it as it is)."""
        return g

    def refuse_target(self, src, target, members):
        if members and not target.dense_dtype:
            return (f"{src}: an NVFP4 checkpoint ({self.layout_label} layout) converts to bf16 or fp16 only, "
                    f"not {target.name}")
        return None

    def decode(self, xs, block_size, out_dtype):
        if len(xs) < 3:  # a block FP8 weight kept beside the NVFP4 ones
            return super().decode(xs, block_size, out_dtype)
        from .. import dispatch

        packed, wscale, wscale2 = xs
        return dispatch.dequant_nvfp4(packed, wscale, self.stored_global_scale(wscale2), out_dtype=out_dtype)

    def convert_decision(self, name, info, scale, candidate, source):
        from ..classify import Decision, KEEP

        if not candidate:
            return None
        if info.shape[-1] % GROUP:
            return KEEP, self.unaligned_error_rule
        if kept := self.kept_reason(name, info.shape):
            return KEEP, kept  # 3D, not fused experts (those are written per expert)
        return Decision.NVFP4, f"{'fp8' if scale else 'bf16'}->{self.name}"

    def outputs(self, name, shape, dtype="BF16"):
        """The weight as it is named (3D fused experts whole, one scale_2 per expert)."""
        from ..st_io import OutEntry

        global_shape = tuple(shape[:-2]) if len(shape) == 3 else ()
        return [OutEntry(name, "U8", (*shape[:-1], shape[-1] // 2)),
                OutEntry(name + "_scale", "F8_E4M3", (*shape[:-1], shape[-1] // GROUP)),
                OutEntry(name + "_scale_2", "F32", global_shape)]

    def encode(self, x, *, name="", src_scale_inv=None, src_block_size=(128, 128), rule=None, global_amax=None):
        """bf16, or FP8 dequantized in the same pass, with the joint amax of its fused group."""
        from .. import dispatch

        return list(dispatch.quant_nvfp4(x, global_amax=global_amax, src_scale_inv=src_scale_inv,
                                         src_block_size=src_block_size))

    def quantization_config(self, plan):
        return modelopt_config_json(plan)

    def written_members(self, qt, st):
        src_of = self.sources_of(st)
        return {self.member_key(logical): Member((packed, scale, global_scale), src_of.get(self.member_key(logical)))
                for packed, (scale, global_scale, logical) in sorted(self.global_scaled_members(qt).items())}

    def sources_of(self, st: dict) -> dict:
        """member key -> (source tensor, None): ModelOpt keeps the source's names, fused 3D experts whole."""
        return {n: (n, None) for n in st}

    def check_member(self, ckpt, mem):
        """Dtypes and shapes of one NVFP4 weight and its scales, and their values (e4m3 group scales not
        NaN, global scales finite and > 0), before anything is compared: one line naming the tensor."""
        import torch

        from ..source_checks import PlanError
        from ..st_io import read_tensor

        qt = ckpt.tensors
        elements, scale, global_scale = mem.tensors
        w, sc, g = qt[elements], qt[scale], qt[global_scale]
        *lead, rows, half = w.shape
        want = (*lead, rows, 2 * half // GROUP)
        if w.dtype != "U8" or sc.dtype != "F8_E4M3" or g.dtype != "F32" or len(w.shape) not in (2, 3):
            raise PlanError(f"{w.file.name}: NVFP4 tensor {mem.elements!r} is {w.dtype} {list(w.shape)} with scales "
                            f"{sc.dtype}, {g.dtype}; expected U8 2D/3D with an F8_E4M3 group scale and an F32 global one")
        if tuple(sc.shape) != want or math.prod(g.shape) != (lead[0] if lead else 1):
            raise PlanError(f"{sc.file.name}: scales {mem.scale!r} {list(sc.shape)} and {global_scale!r} "
                            f"{list(g.shape)} do not fit NVFP4 weight {mem.elements!r} {list(w.shape)} (needs "
                            f"{list(want)} and {lead[0] if lead else 1} global)")
        nan = (read_tensor(sc).view(torch.uint8) & 0x7F) == 0x7F
        gv = read_tensor(g).float()
        if bool(nan.any()) or not bool((torch.isfinite(gv) & (gv > 0)).all()):
            name = scale if bool(nan.any()) else global_scale
            raise PlanError(f"{qt[name].file.name}: scale {name!r} holds invalid values (NaN, Inf or <= 0); its "
                            "weight cannot be read")

    def scale_2(self, stored_global):
        """ModelOpt's scale_2 (fp32) from the global scale as this layout stores it."""
        return stored_global.float()

    def compare_member(self, key, shard, stored, x, bands, mx_rule=None):
        from ..checks import compare_nvfp4  # torch: not at the registry's import

        packed, scale, global_scale = stored
        return compare_nvfp4(self, key, shard, packed, scale, self.scale_2(global_scale), x, bands,
                             exact_scale_2=self.stores_scale_2)

    @property
    def stores_scale_2(self) -> bool:
        """scale_2 stored as the quantizer formed it (ModelOpt), not its reciprocal: exact ties."""
        return True

    def config_beside(self, quant):
        """ModelOpt's own exports may declare it in hf_quant_config.json only."""
        path = quant / HF_QUANT_CONFIG
        try:
            hf_quant = json.loads(path.read_text()).get("quantization") if path.exists() else None
        except (OSError, ValueError, AttributeError):
            hf_quant = None
        return {"quant_method": "modelopt", **hf_quant} if isinstance(hf_quant, dict) else {}

    def extra_files(self, plan):
        from .. import __version__

        return {HF_QUANT_CONFIG: json.dumps({"producer": {"name": "modelopt", "version": f"fp8norm-{__version__}"},
                                             "quantization": modelopt_quantization(plan)}, indent=2) + "\n"}


FORMAT = Nvfp4(
    name="nvfp4", summary="NVFP4, ModelOpt layout (Blackwell)",
    element="e2m1", scale_block=(1, 16), elements_per_byte=2, layout="modelopt",
    from_bf16=("convert", "--to", "nvfp4"), from_fp8=("convert", "--to", "nvfp4"),
    floor_sqnr_db=20.5, detect_order=10, verify_key="nvfp4", weight_label="NVFP4",
    shard_refusal="shard does not split NVFP4 weights (16-element groups under a per-tensor global scale) yet; "
                  "shard the FP8 or bf16 model (or `fp8norm convert --to bf16` first)",
    verify_bands=(0.0951, 13.9, 10.3),
    serve_note="NVFP4: a Blackwell GPU", extra_file_names=(HF_QUANT_CONFIG,),
)
