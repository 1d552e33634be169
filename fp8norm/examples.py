"""Tiny synthetic checkpoints with the real tensor names (and ragged shapes) of each model family.

Used by the README's first command, the tests and tools/make_tiny_checkpoint.py. Random bf16 weights,
a config.json, tokenizer files, a chat template, a generation config and (for some) a python file
and a subfolder, as real Hugging Face checkpoint directories have.
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

H, I, V = 320, 704, 512  # hidden, intermediate, vocab: ragged against 128 on purpose


def _attn(p: str, qk_norm: bool) -> Iterator[tuple[str, tuple]]:
    yield f"{p}.self_attn.q_proj.weight", (H, H)
    yield f"{p}.self_attn.k_proj.weight", (160, H)
    yield f"{p}.self_attn.v_proj.weight", (160, H)
    yield f"{p}.self_attn.o_proj.weight", (H, H)
    if qk_norm:
        yield f"{p}.self_attn.q_norm.weight", (32,)
        yield f"{p}.self_attn.k_norm.weight", (32,)


def _norms(p: str) -> Iterator[tuple[str, tuple]]:
    yield f"{p}.input_layernorm.weight", (H,)
    yield f"{p}.post_attention_layernorm.weight", (H,)


def _dense_mlp(p: str, inter: int = I) -> Iterator[tuple[str, tuple]]:
    for proj in ("gate_proj", "up_proj"):
        yield f"{p}.mlp.{proj}.weight", (inter, H)
    yield f"{p}.mlp.down_proj.weight", (H, inter)


def _experts(p: str, n: int, inter: int, names=("gate_proj", "up_proj", "down_proj"), moe="mlp"):
    for e in range(n):
        yield f"{p}.{moe}.experts.{e}.{names[0]}.weight", (inter, H)
        yield f"{p}.{moe}.experts.{e}.{names[1]}.weight", (inter, H)
        yield f"{p}.{moe}.experts.{e}.{names[2]}.weight", (H, inter)


def llama() -> Iterator[tuple[str, tuple]]:
    yield "model.embed_tokens.weight", (V, H)
    for i in range(2):
        p = f"model.layers.{i}"
        yield from _norms(p)
        yield from _attn(p, qk_norm=True)
        yield from _dense_mlp(p)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


def qwen3_moe() -> Iterator[tuple[str, tuple]]:
    yield "model.embed_tokens.weight", (V, H)
    for i in range(2):
        p = f"model.layers.{i}"
        yield from _norms(p)
        yield from _attn(p, qk_norm=True)
        yield f"{p}.mlp.gate.weight", (4, H)
        yield from _experts(p, 4, 192)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


def qwen35_moe() -> Iterator[tuple[str, tuple]]:
    lm = "model.language_model"
    yield f"{lm}.embed_tokens.weight", (V, H)
    for i in range(2):
        p = f"{lm}.layers.{i}"
        yield from _norms(p)
        if i == 0:  # linear attention (Gated DeltaNet)
            la = f"{p}.linear_attn"
            yield f"{la}.in_proj_qkv.weight", (384, H)
            yield f"{la}.in_proj_z.weight", (256, H)
            yield f"{la}.in_proj_a.weight", (4, H)
            yield f"{la}.in_proj_b.weight", (4, H)
            yield f"{la}.conv1d.weight", (384, 1, 4)
            yield f"{la}.A_log", (4,)
            yield f"{la}.dt_bias", (4,)
            yield f"{la}.norm.weight", (64,)
            yield f"{la}.out_proj.weight", (H, 256)
        else:
            yield from _attn(p, qk_norm=True)
        yield f"{p}.mlp.gate.weight", (4, H)
        yield f"{p}.mlp.experts.gate_up_proj", (4, 2 * 192, H)
        yield f"{p}.mlp.experts.down_proj", (4, H, 192)
        yield f"{p}.mlp.shared_expert.gate_proj.weight", (192, H)
        yield f"{p}.mlp.shared_expert.up_proj.weight", (192, H)
        yield f"{p}.mlp.shared_expert.down_proj.weight", (H, 192)
        yield f"{p}.mlp.shared_expert_gate.weight", (1, H)
    yield f"{lm}.norm.weight", (H,)
    yield "model.visual.patch_embed.proj.weight", (256, 3, 2, 16, 16)
    yield "model.visual.blocks.0.attn.qkv.weight", (768, 256)
    yield "model.visual.blocks.0.attn.qkv.bias", (768,)
    yield "model.visual.blocks.0.attn.proj.weight", (256, 256)
    yield "model.visual.blocks.0.mlp.linear_fc1.weight", (512, 256)
    yield "model.visual.merger.linear_fc2.weight", (H, 512)
    yield "mtp.fc.weight", (H, 2 * H)
    yield "mtp.pre_fc_norm_embedding.weight", (H,)
    yield "mtp.pre_fc_norm_hidden.weight", (H,)
    yield from _norms("mtp.layers.0")
    yield from _attn("mtp.layers.0", qk_norm=True)
    yield "mtp.layers.0.mlp.gate.weight", (4, H)
    yield "mtp.layers.0.mlp.experts.gate_up_proj", (4, 2 * 192, H)
    yield "mtp.layers.0.mlp.experts.down_proj", (4, H, 192)
    yield "mtp.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


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
        yield f"{a}.q_a_proj.weight", (192, H)
        yield f"{a}.q_a_layernorm.weight", (192,)
        yield f"{a}.q_b_proj.weight", (4 * 96, 192)
        yield f"{a}.kv_a_proj_with_mqa.weight", (128 + 32, H)
        yield f"{a}.kv_a_layernorm.weight", (128,)
        yield f"{a}.kv_b_proj.weight", (4 * 128, 128)
        yield f"{a}.o_proj.weight", (H, 4 * 64)
        if i == 0:
            yield from _dense_mlp(p)
        else:
            yield f"{p}.mlp.gate.weight", (4, H)
            yield f"{p}.mlp.gate.e_score_correction_bias", (4,)
            yield from _experts(p, 4, 192)
            yield f"{p}.mlp.shared_experts.gate_proj.weight", (192, H)
            yield f"{p}.mlp.shared_experts.up_proj.weight", (192, H)
            yield f"{p}.mlp.shared_experts.down_proj.weight", (H, 192)
        if i == 2:
            yield f"{p}.shared_head.norm.weight", (H,)
            yield f"{p}.shared_head.head.weight", (V, H)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


_SPECS = {"llama": (llama, "llama"), "qwen3-moe": (qwen3_moe, "qwen3_moe"),
          "qwen3.5-moe": (qwen35_moe, "qwen3_5_moe"), "deepseek-v3": (deepseek_v3, "deepseek_v3")}


def family_tensors(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    if family not in _SPECS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _SPECS[family][0]():
        t = torch.randn(shape, generator=g) * (1.0 if "norm" in name else 0.02)
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
    cfg = {"architectures": ["Example"], "model_type": _SPECS[family][1], "hidden_size": H, "vocab_size": V,
           "num_hidden_layers": 2, "num_attention_heads": H // 32, "num_key_value_heads": 160 // 32, "head_dim": 32,
           "intermediate_size": I, "torch_dtype": "bfloat16", "fp8norm_example": family}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6}))
    (dst / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    (dst / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    (dst / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}\n")
    if family == "deepseek-v3":
        (dst / "modeling_deepseek.py").write_text("# custom modeling code travels with the checkpoint\n")
        (dst / "assets").mkdir()
        (dst / "assets" / "README.txt").write_text("a subfolder\n")
    return dst
