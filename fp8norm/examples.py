"""Tiny synthetic checkpoints that look like real ones: each family's real tensor names, a config
transformers loads, weights shaped like trained LLM weights, and a real (small) tokenizer.

Used by the README's first command, the tests and tools/make_tiny_checkpoint.py.

- Sizes allow model parallelism and block-aligned FP8: hidden 256, intermediate 512 (experts 256),
  vocab 512 (all multiples of 256); llama and qwen3-moe have 16 heads and 8 kv heads of head_dim
  128, so `shard --tp 2`, `--ep 2` (4 experts) and `--layout deepseek --mp 2` split on 128x128 tiles.
- Weights: heavy-tailed (a Gaussian scale mixture, Laplace-like, std 0.02) with a few outlier input
  channels per matrix (1 in 64 columns, 8-30x larger), as trained LLM weights have; RMSNorm
  weights near 1.
- tokenizer.json / tokenizer_config.json: a 512-token byte-level BPE built with `tokenizers` and
  saved by transformers (tools/make_tokenizer.py), so `collect-stats` runs on every example.
- Plus a chat template, a generation config and (deepseek-v3) a python file and a subfolder, as real
  Hugging Face checkpoint directories have.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_NAME, SINGLE_NAME, shard_name

FAMILIES = ("llama", "qwen3-moe", "qwen3.5-moe", "deepseek-v3")
LAYOUTS = ("sharded", "single", "engine")

H, I, MI, V = 256, 512, 256, 512  # hidden, intermediate, expert intermediate, vocab
HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
EXPERTS = 4
TOKENIZER_DIR = Path(__file__).parent / "data" / "tokenizer"


def _attn(p: str, qk_norm: bool, heads: int = HEADS, kv_heads: int = KV_HEADS, gated: bool = False):
    q_rows = heads * HEAD_DIM * (2 if gated else 1)  # Qwen3.5 full attention: q and its output gate
    yield f"{p}.self_attn.q_proj.weight", (q_rows, H)
    yield f"{p}.self_attn.k_proj.weight", (kv_heads * HEAD_DIM, H)
    yield f"{p}.self_attn.v_proj.weight", (kv_heads * HEAD_DIM, H)
    yield f"{p}.self_attn.o_proj.weight", (H, heads * HEAD_DIM)
    if qk_norm:
        yield f"{p}.self_attn.q_norm.weight", (HEAD_DIM,)
        yield f"{p}.self_attn.k_norm.weight", (HEAD_DIM,)


def _norms(p: str) -> Iterator[tuple[str, tuple]]:
    yield f"{p}.input_layernorm.weight", (H,)
    yield f"{p}.post_attention_layernorm.weight", (H,)


def _dense_mlp(p: str, inter: int = I) -> Iterator[tuple[str, tuple]]:
    """gate/up/down under prefix `p` (e.g. model.layers.0.mlp)."""
    for proj in ("gate_proj", "up_proj"):
        yield f"{p}.{proj}.weight", (inter, H)
    yield f"{p}.down_proj.weight", (H, inter)


def _experts(p: str, n: int = EXPERTS, inter: int = MI):
    for e in range(n):
        yield from _dense_mlp(f"{p}.mlp.experts.{e}", inter)


def _fused_experts(p: str):
    yield f"{p}.mlp.experts.gate_up_proj", (EXPERTS, 2 * MI, H)
    yield f"{p}.mlp.experts.down_proj", (EXPERTS, H, MI)


def llama() -> Iterator[tuple[str, tuple]]:
    yield "model.embed_tokens.weight", (V, H)
    for i in range(2):
        p = f"model.layers.{i}"
        yield from _norms(p)
        yield from _attn(p, qk_norm=False)
        yield from _dense_mlp(f"{p}.mlp")
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


def qwen3_moe() -> Iterator[tuple[str, tuple]]:
    yield "model.embed_tokens.weight", (V, H)
    for i in range(2):
        p = f"model.layers.{i}"
        yield from _norms(p)
        yield from _attn(p, qk_norm=True)
        yield f"{p}.mlp.gate.weight", (EXPERTS, H)
        yield from _experts(p)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


QWEN35_HEADS, QWEN35_KV_HEADS = 8, 4


def _qwen35_moe_block(p: str):
    yield f"{p}.mlp.gate.weight", (EXPERTS, H)
    yield from _fused_experts(p)
    yield from _dense_mlp(f"{p}.mlp.shared_expert", MI)
    yield f"{p}.mlp.shared_expert_gate.weight", (1, H)


def qwen35_moe() -> Iterator[tuple[str, tuple]]:
    lm = "model.language_model"
    yield f"{lm}.embed_tokens.weight", (V, H)
    for i in range(2):
        p = f"{lm}.layers.{i}"
        yield from _norms(p)
        if i == 0:  # linear attention (Gated DeltaNet): 2 key heads and 4 value heads of 64
            la = f"{p}.linear_attn"
            yield f"{la}.in_proj_qkv.weight", (512, H)
            yield f"{la}.in_proj_z.weight", (256, H)
            yield f"{la}.in_proj_a.weight", (4, H)
            yield f"{la}.in_proj_b.weight", (4, H)
            yield f"{la}.conv1d.weight", (512, 1, 4)
            yield f"{la}.A_log", (4,)
            yield f"{la}.dt_bias", (4,)
            yield f"{la}.norm.weight", (64,)
            yield f"{la}.out_proj.weight", (H, 256)
        else:
            yield from _attn(p, qk_norm=True, heads=QWEN35_HEADS, kv_heads=QWEN35_KV_HEADS, gated=True)
        yield from _qwen35_moe_block(p)
    yield f"{lm}.norm.weight", (H,)
    v = "model.visual"  # one vision block of width 128
    yield f"{v}.patch_embed.proj.weight", (128, 3, 2, 16, 16)
    yield f"{v}.patch_embed.proj.bias", (128,)
    yield f"{v}.pos_embed.weight", (64, 128)
    for n in ("norm1", "norm2"):
        yield f"{v}.blocks.0.{n}.weight", (128,)
        yield f"{v}.blocks.0.{n}.bias", (128,)
    for n, shape in (("attn.qkv", (384, 128)), ("attn.proj", (128, 128)), ("mlp.linear_fc1", (256, 128)),
                     ("mlp.linear_fc2", (128, 256)), ("merger.linear_fc1", (512, 512)),
                     ("merger.linear_fc2", (H, 512))):
        pre = v if n.startswith("merger") else f"{v}.blocks.0"
        yield f"{pre}.{n}.weight", shape
        yield f"{pre}.{n}.bias", (shape[0],)
    yield f"{v}.merger.norm.weight", (128,)
    yield f"{v}.merger.norm.bias", (128,)
    yield "mtp.fc.weight", (H, 2 * H)
    yield "mtp.pre_fc_norm_embedding.weight", (H,)
    yield "mtp.pre_fc_norm_hidden.weight", (H,)
    yield from _norms("mtp.layers.0")
    yield from _attn("mtp.layers.0", qk_norm=True, heads=QWEN35_HEADS, kv_heads=QWEN35_KV_HEADS, gated=True)
    yield "mtp.layers.0.mlp.gate.weight", (EXPERTS, H)
    yield from _fused_experts("mtp.layers.0")
    yield "mtp.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


# DeepSeek-V3's MLA at 8 heads: q_lora 256, kv_lora 128, qk_nope 128 + rope 64, v 128
DS_HEADS, DS_Q_LORA, DS_KV_LORA, DS_NOPE, DS_ROPE, DS_V = 8, 256, 128, 128, 64, 128


def deepseek_v3() -> Iterator[tuple[str, tuple]]:
    yield "model.embed_tokens.weight", (V, H)
    for i in range(3):  # layer 2 is the MTP layer (num_hidden_layers = 2)
        p = f"model.layers.{i}"
        if i == 2:
            yield f"{p}.embed_tokens.weight", (V, H)
            yield f"{p}.enorm.weight", (H,)
            yield f"{p}.hnorm.weight", (H,)
            yield f"{p}.eh_proj.weight", (H, 2 * H)
        yield from _norms(p)
        a = f"{p}.self_attn"
        yield f"{a}.q_a_proj.weight", (DS_Q_LORA, H)
        yield f"{a}.q_a_layernorm.weight", (DS_Q_LORA,)
        yield f"{a}.q_b_proj.weight", (DS_HEADS * (DS_NOPE + DS_ROPE), DS_Q_LORA)
        yield f"{a}.kv_a_proj_with_mqa.weight", (DS_KV_LORA + DS_ROPE, H)
        yield f"{a}.kv_a_layernorm.weight", (DS_KV_LORA,)
        yield f"{a}.kv_b_proj.weight", (DS_HEADS * (DS_NOPE + DS_V), DS_KV_LORA)
        yield f"{a}.o_proj.weight", (H, DS_HEADS * DS_V)
        if i == 0:
            yield from _dense_mlp(f"{p}.mlp")
        else:
            yield f"{p}.mlp.gate.weight", (EXPERTS, H)
            yield f"{p}.mlp.gate.e_score_correction_bias", (EXPERTS,)
            yield from _experts(p)
            yield from _dense_mlp(f"{p}.mlp.shared_experts", MI)
        if i == 2:
            yield f"{p}.shared_head.norm.weight", (H,)
            yield f"{p}.shared_head.head.weight", (V, H)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


_COMMON = {"vocab_size": V, "hidden_size": H, "num_hidden_layers": 2, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": 0,
           "pad_token_id": 0, "torch_dtype": "bfloat16"}


def _config(family: str) -> dict:
    """config.json as transformers writes it for these sizes (it loads them with AutoModelForCausalLM)."""
    attn = {"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM}
    if family == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "intermediate_size": I,
                **attn, **_COMMON}
    if family == "qwen3-moe":
        return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "intermediate_size": I,
                "moe_intermediate_size": MI, "num_experts": EXPERTS, "num_experts_per_tok": 2,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, **attn, **_COMMON}
    if family == "deepseek-v3":
        return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "intermediate_size": I,
                "moe_intermediate_size": MI, "n_routed_experts": EXPERTS, "n_shared_experts": 1,
                "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                "num_nextn_predict_layers": 1, "num_attention_heads": DS_HEADS, "num_key_value_heads": DS_HEADS,
                "q_lora_rank": DS_Q_LORA, "kv_lora_rank": DS_KV_LORA, "qk_nope_head_dim": DS_NOPE,
                "qk_rope_head_dim": DS_ROPE, "v_head_dim": DS_V, "head_dim": DS_ROPE, "rope_scaling": None,
                **_COMMON}
    text = {"model_type": "qwen3_5_moe_text", "num_attention_heads": QWEN35_HEADS,
            "num_key_value_heads": QWEN35_KV_HEADS, "head_dim": HEAD_DIM, "moe_intermediate_size": MI,
            "shared_expert_intermediate_size": MI, "num_experts": EXPERTS, "num_experts_per_tok": 2,
            "linear_num_key_heads": 2, "linear_key_head_dim": 64, "linear_num_value_heads": 4,
            "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4, "mtp_num_hidden_layers": 1,
            "layer_types": ["linear_attention", "full_attention"], **_COMMON}
    vision = {"model_type": "qwen3_5_moe_vision", "depth": 1, "hidden_size": 128, "intermediate_size": 256,
              "num_heads": 2, "out_hidden_size": H, "patch_size": 16, "temporal_patch_size": 2,
              "spatial_merge_size": 2, "num_position_embeddings": 64}
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "text_config": text, "vision_config": vision, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


_SPECS = {"llama": llama, "qwen3-moe": qwen3_moe, "qwen3.5-moe": qwen35_moe, "deepseek-v3": deepseek_v3}


def heavy_tailed(shape: tuple[int, ...], g: torch.Generator, std: float = 0.02,
                 outlier_every: int = 64) -> torch.Tensor:
    """Weights like a trained LLM's: a Gaussian scale mixture (Laplace-like tails, std `std`) with
    one input channel in `outlier_every` (at least one) scaled 8-30x, the same channels in every
    row (and expert), as activation-outlier channels are."""
    x = torch.randn(shape, generator=g) * torch.empty(shape).exponential_(generator=g).sqrt_() * std
    n_in = shape[-1]
    if len(shape) >= 2 and n_in >= 16:
        cols = torch.randperm(n_in, generator=g)[:max(1, n_in // outlier_every)]
        x[..., cols] *= 8 + 22 * torch.rand(len(cols), generator=g)
    return x


def family_tensors(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    if family not in _SPECS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _SPECS[family]():
        if "norm" in name and len(shape) == 1 and name.endswith("weight"):
            t = 1.0 + 0.05 * torch.randn(shape, generator=g)  # RMSNorm / LayerNorm gains sit near 1
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            t = heavy_tailed(shape, g)
        out[name] = t.to(torch.float32 if name.endswith("A_log") else torch.bfloat16)
    return out


def make_example(dst: str | Path, family: str = "qwen3.5-moe", layout: str = "sharded", shards: int = 3,
                 seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny checkpoint of `family` into `dst` (created; must be empty unless `overwrite`)."""
    dst = Path(dst)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dst}: exists and is not empty (use --overwrite)")
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = family_tensors(family, seed)
    names = list(tensors)
    n = 1 if layout == "single" else shards
    groups = [names[i * len(names) // n:(i + 1) * len(names) // n] for i in range(n)]
    if layout == "single":
        files = [SINGLE_NAME]
    elif layout == "engine":
        files = [f"model-language-{i:04d}-fused-save_rank{i}.safetensors" for i in range(n)]
    else:
        files = [shard_name(i, n) for i in range(n)]
    for fname, group in zip(files, groups):
        save_file({k: tensors[k].contiguous() for k in group}, str(dst / fname), metadata={"format": "pt"})
    if layout == "sharded":
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {k: f for f, g in zip(files, groups) for k in g}}
        (dst / INDEX_NAME).write_text(json.dumps(index, indent=2))
    cfg = {**_config(family), "fp8norm_example": family}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6,
                                                            "eos_token_id": 0}))
    for f in sorted(TOKENIZER_DIR.iterdir()):
        shutil.copyfile(f, dst / f.name)
    (dst / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}\n")
    if family == "deepseek-v3":
        (dst / "modeling_deepseek.py").write_text("# custom modeling code travels with the checkpoint\n")
        (dst / "assets").mkdir()
        (dst / "assets" / "README.txt").write_text("a subfolder\n")
    return dst
