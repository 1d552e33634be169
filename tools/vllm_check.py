#!/usr/bin/env python
"""vLLM's own loader as a check of fp8norm's output; run through tools/vllm_check.sh (its venv).

For a tiny Qwen3 and a tiny Qwen3-MoE (made here with transformers) and each fp8norm scheme, in a
child process per case: quantize with fp8norm, load with `vllm.LLM(...)` (config parsing, kernel
selection, weight loading, qkv/gate_up fusion, expert stacking), generate two tokens, and check
  - every tensor of the checkpoint was handed to vLLM's model loader,
  - every parameter was initialized from the checkpoint (vLLM's strict weights tracking),
  - each weight vLLM holds (read just before its post-loading repacking) equals fp8norm's
    dequantization of the checkpoint, fused modules (qkv, gate_up, stacked experts) included.
Without AMX, vLLM's CPU FP8 GEMMs (linear and MoE) cannot run; they are then replaced by a
dequantize-then-matmul emulation, and the output says so. Nothing else of vLLM is replaced.

    tools/vllm_check.sh [--schemes fp8-block,fp8-channel,mxfp8,mxfp4] [--models qwen3,qwen3-moe] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

SCHEMES = ("fp8-block", "fp8-channel", "mxfp8", "mxfp4")
MODELS = ("qwen3", "qwen3-moe")
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Attention / KV-cache quantization parameters vLLM creates with defaults when a checkpoint has none
# (its strict weights tracking exempts them too): not checkpoint tensors.
KV_CACHE_PARAMS = ("q_scale", "k_scale", "v_scale", "prob_scale", "q_zero_point", "k_zero_point", "v_zero_point")
# vLLM's refusals at kernel selection, after parsing the config: the scheme has no CPU kernel.
UNSUPPORTED = ("Failed to find a kernel", "Unsupported FP8 MoE backend")


# --------------------------------------------------------------------------- models


def make_model(kind: str, dst: Path) -> Path:
    import torch
    import transformers

    common = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(intermediate_size=512, **common))
    else:
        cfg = transformers.Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=256, num_experts=8,
                                          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(dst)
    return dst


# --------------------------------------------------------------------------- expected weights (fp8norm)


def read_checkpoint(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ours(ck: dict, module: str):
    """fp8norm's dequantization (fp32) of `module`'s weight in checkpoint `ck`, whatever its layout;
    `module` may also name a fused 3D tensor (`...experts.gate_up_proj`). None if absent."""
    import torch

    from fp8norm import reference as ref

    w = module + ".weight" if module + ".weight" in ck or module + ".weight_packed" in ck else module
    if w + "_scale_inv" in ck:
        return ref.dequant_fp8_block(ck[w], ck[w + "_scale_inv"], out_dtype=torch.float32)
    if module + ".weight_packed" in ck:
        return ref.dequant_mx(ck[module + ".weight_packed"], ck[module + ".weight_scale"], fmt="mxfp4",
                              out_dtype=torch.float32)
    if module + ".weight_scale" in ck:
        s = ck[module + ".weight_scale"]
        if s.dtype == torch.uint8:
            return ref.dequant_mx(ck[w], s, fmt="mxfp8", out_dtype=torch.float32)
        return ref.dequant_fp8_channel(ck[w], s.float(), out_dtype=torch.float32)
    return ck[w].float() if w in ck else None


def expected(ck: dict, vname: str):
    """What vLLM's parameter `vname` should hold, dequantized, from fp8norm's checkpoint."""
    import torch

    module, _, base = vname.rpartition(".")
    if base in ("w13_weight", "w2_weight"):  # stacked experts: [E, 2I, H] (gate rows, then up) / [E, H, I]
        module = module.removesuffix(".routed_experts")  # vLLM's FusedMoE may sit one level down
        fused = ours(ck, f"{module}.{'gate_up_proj' if base == 'w13_weight' else 'down_proj'}")
        if fused is not None and fused.dim() == 3:
            return fused
        per = []
        for e in range(10_000):
            parts = ("gate_proj", "up_proj") if base == "w13_weight" else ("down_proj",)
            got = [ours(ck, f"{module}.{e}.{p}") for p in parts]
            if got[0] is None:
                break
            per.append(torch.cat(got))
        return torch.stack(per) if per else None
    if base != "weight":
        return None
    parent, _, leaf = module.rpartition(".")
    if leaf in STACKED:
        got = [ours(ck, f"{parent}.{p}") for p in STACKED[leaf]]
        return torch.cat(got) if all(g is not None for g in got) else None
    return ours(ck, module)


def vllm_value(params: dict, vname: str, scheme: str):
    """vLLM's raw parameter (and its scales), dequantized with fp8norm's reference for `scheme`."""
    import torch

    from fp8norm import reference as ref

    module, _, base = vname.rpartition(".")
    w = params.get(vname, params.get(f"{module}.{base}_packed"))
    scale = next((params[f"{module}.{base}{s}"] for s in ("_scale_inv", "_scale") if f"{module}.{base}{s}" in params),
                 None)
    if w is None:
        return None
    if scale is None or w.dtype not in (torch.float8_e4m3fn, torch.uint8):
        return w.float()
    if scheme == "fp8-block":
        return ref.dequant_fp8_block(w, scale.float(), out_dtype=torch.float32)
    if scheme == "fp8-channel":
        return ref.dequant_fp8_channel(w, scale.float().reshape(*w.shape[:-1], 1), out_dtype=torch.float32)
    return ref.dequant_mx(w, scale.view(torch.uint8), fmt=scheme, out_dtype=torch.float32)


# --------------------------------------------------------------------------- emulation (no AMX)


def _dequant_any(w, s):
    """FP8 weight [.., N, K] (or transposed [K, N] for per-tensor) times its scale: per tensor, per row
    or per 2D block (block size from the shapes)."""
    import torch

    w = w.float()
    s = s.float()
    if s.numel() == 1:
        return w * s.reshape(())
    n, k = w.shape[-2:]
    if s.shape[-1] == 1 and s.shape[-2] == n:
        return w * s
    bm, bn = -(-n // s.shape[-2]), -(-k // s.shape[-1])
    return w * s.repeat_interleave(bm, -2)[..., :n, :].repeat_interleave(bn, -1)[..., :k]


def install_emulation() -> list[str]:
    """Replace vLLM's AMX-only CPU FP8 GEMMs (linear, block and per-tensor; MoE) by dequantize-then-
    matmul in torch. Returns what was replaced."""
    import torch
    import torch.nn.functional as F
    from vllm.model_executor.kernels.linear.scaled_mm import cpu as lin
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    def supported(cls, compute_capability=None):
        return True, None

    def keep_weights(self, layer):
        for name in ("weight_scale_inv", "weight_scale"):
            s = getattr(layer, name, None)
            if s is not None and s.dtype in (torch.uint8, torch.float8_e8m0fnu):
                setattr(layer, name, torch.nn.Parameter(torch.pow(2.0, s.data.view(torch.uint8).float() - 127),
                                                        requires_grad=False))

    def linear(self, layer, x, bias=None, **kwargs):
        w = layer.weight
        s = getattr(layer, "weight_scale_inv", None)
        s = layer.weight_scale if s is None else s
        if w.shape[-1] != x.shape[-1]:  # Fp8LinearMethod's (K, N) layout for per-tensor kernels
            w = w.t()
        return F.linear(x, _dequant_any(w, s).to(x.dtype), bias)

    replaced = []
    for cls in (lin.CPUFp8BlockScaledMMKernel, lin.CPUFp8PerTensorScaledMMLinearKernel):
        cls.is_supported = classmethod(supported)
        cls.process_weights_after_loading = keep_weights
        cls.apply_weights = linear
        replaced.append(cls.__name__)

    def moe(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
            expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
            apply_router_weight_on_input):
        w13, w2d = _dequant_any(w1, self.w1_scale), _dequant_any(w2, self.w2_scale)
        x = hidden_states.float()
        out = torch.zeros(x.shape[0], w2d.shape[1])
        for t in range(x.shape[0]):
            for k in range(topk_ids.shape[1]):
                e = int(topk_ids[t, k])
                gate, up = (w13[e] @ x[t]).chunk(2)
                out[t] += float(topk_weights[t, k]) * (w2d[e] @ (F.silu(gate) * up))
        output.copy_(out.to(output.dtype))

    cpu_moe.CPUExpertsFp8._supports_current_device = staticmethod(lambda: True)
    cpu_moe.prepare_fp8_moe_layer_for_cpu = lambda w13, w2: (w13, w2)
    cpu_moe.CPUExpertsFp8.apply = moe
    replaced.append("CPUExpertsFp8")
    return replaced


# --------------------------------------------------------------------------- one case (child process)


def run_case(model_dir: Path, scheme: str, work: Path) -> dict:
    import torch

    from fp8norm.quantize import quantize

    dst = work / f"{model_dir.name}-{scheme}"
    quantize(model_dir, dst, scheme=scheme, overwrite=True, progress=False, verify_samples=0)
    ck = read_checkpoint(dst)
    result = {"model": model_dir.name, "scheme": scheme, "tensors": len(ck)}

    import vllm
    import vllm.model_executor.model_loader.base_loader as base_loader
    import vllm.model_executor.model_loader.default_loader as default_loader

    amx = bool(torch.cpu._is_amx_tile_supported())
    result["emulated"] = [] if amx else install_emulation()
    captured, yielded = {}, set()
    process = base_loader.process_weights_after_loading

    def capture(model, model_config, target_device):
        captured.update({n: p.detach().cpu().clone() for n, p in model.named_parameters()})
        return process(model, model_config, target_device)

    base_loader.process_weights_after_loading = capture
    all_weights = default_loader.DefaultModelLoader.get_all_weights

    def recorded(self, *args, **kwargs):
        for name, t in all_weights(self, *args, **kwargs):
            yielded.add(name)
            yield name, t

    default_loader.DefaultModelLoader.get_all_weights = recorded
    llm = vllm.LLM(model=str(dst), dtype="bfloat16", enforce_eager=True, max_model_len=128, max_num_seqs=1,
                   skip_tokenizer_init=True, model_loader_extra_config={"enable_weights_track": True})
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}],
                       vllm.SamplingParams(max_tokens=2, temperature=0.0, detokenize=False))
    result["generated"] = list(out[0].outputs[0].token_ids)
    result["not_handed_to_loader"] = sorted(set(ck) - yielded)
    compared, mismatched, unmapped = 0, [], []
    for name in captured:
        want = expected(ck, name)
        if want is None:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in KV_CACHE_PARAMS and not leaf.startswith(("w13_weight_", "w2_weight_", "weight_", "input_")):
                unmapped.append(name)  # scales are compared through their weights
            continue
        got = vllm_value(captured, name, scheme)
        compared += 1
        if got is None or got.shape != want.shape or not torch.equal(got, want):
            mismatched.append(name)
    result.update(compared=compared, mismatched=mismatched, unmapped=unmapped)
    result["ok"] = not (mismatched or unmapped or result["not_handed_to_loader"])
    return result


def child(args) -> None:
    try:
        res = run_case(Path(args.model_dir), args.case_scheme, Path(args.work))
    except Exception as e:  # noqa: BLE001 - reported as the case's result
        tb = traceback.format_exc().strip().splitlines()
        res = {"model": Path(args.model_dir).name, "scheme": args.case_scheme, "ok": False,
               "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400], "where": tb[-3:]}
    print("VLLM_CHECK_RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------- driver


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--keep", default=None, help="Work directory to keep (default: a temporary one).")
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--case-scheme", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case_scheme:
        child(args)
        return 0
    import torch
    import vllm

    work = Path(args.keep or tempfile.mkdtemp(prefix="fp8norm-vllm-check-"))
    work.mkdir(parents=True, exist_ok=True)
    amx = bool(torch.cpu._is_amx_tile_supported())
    print(f"vllm {vllm.__version__}, torch {torch.__version__}, AMX: {'yes' if amx else 'no'}")
    if not amx:
        print("no AMX on this CPU: vLLM's CPU FP8 GEMMs (linear and MoE) are replaced by a dequantize-then-"
              "matmul emulation in torch; loading, fusion, stacking and the weights checked are vLLM's own")
    results = []
    for kind in args.models.split(","):
        model_dir = make_model(kind, work / kind)
        for scheme in args.schemes.split(","):
            proc = subprocess.run([sys.executable, __file__, "--model-dir", str(model_dir), "--case-scheme", scheme,
                                   "--work", str(work)], capture_output=True, text=True, env=os.environ)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_CHECK_RESULT ")), None)
            res = json.loads(line.split(" ", 1)[1]) if line else {
                "model": kind, "scheme": scheme, "ok": False,
                "error": f"child exited {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
            res["unsupported"] = any(u in res.get("error", "") for u in UNSUPPORTED)
            results.append(res)
            if res["unsupported"]:
                print(f"NO-CPU {kind:<10} {scheme:<12} vLLM parsed the config but has no CPU kernel for it: "
                      f"{res['error']}")
            elif res["ok"]:
                print(f"OK    {kind:<10} {scheme:<12} {res['tensors']} tensors handed to vLLM's loader, every "
                      f"parameter initialized, {res['compared']} weights equal fp8norm's dequantization, "
                      f"generated {res['generated']}" + (" (FP8 GEMM emulated)" if res.get("emulated") else ""))
            else:
                detail = res.get("error") or (f"mismatched {res.get('mismatched')}, unmapped {res.get('unmapped')}, "
                                              f"not handed to the loader {res.get('not_handed_to_loader')}")
                print(f"FAIL  {kind:<10} {scheme:<12} {detail}")
    (work / "vllm_check.json").write_text(json.dumps(results, indent=1))
    print(f"details: {work / 'vllm_check.json'}")
    return 0 if all(r["ok"] or r["unsupported"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
