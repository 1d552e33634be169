"""Which tensors become FP8: one readable rule table, reference-guided mode, include/exclude overrides.

Decisions:
  fp8          quantize to e4m3 with a `<name>_scale_inv` beside it
  keep         copy unchanged (original dtype)
  passthrough  already quantized (FP8 and its scale): copied untouched

Precedence, highest first: --exclude, --include, then either the reference checkpoint's choices or
the heuristic rule table (first matching rule wins); structural checks (dtype, rank, size) guard
every fp8 decision. The rule that decided is recorded with each tensor and shown by `fp8norm plan`.
"""

from __future__ import annotations

import enum
import re
from collections import defaultdict
from dataclasses import dataclass

from .st_io import FLOAT_DTYPES, FP8_DTYPES, TensorInfo



class Decision(str, enum.Enum):
    """What is done to a tensor; a str, so plan JSON, tables and fingerprints show its value."""
    FP8, KEEP, PASSTHROUGH = "fp8", "keep", "passthrough"
    # `fp8norm convert`; SCHEME: to fp8-channel / mxfp8 / mxfp4 (fp8norm.formats)
    DEQUANT, DEQUANT_NVFP4, RELABEL = "dequant", "dequant-nvfp4", "relabel"
    UE8M0, NVFP4, SCHEME = "ue8m0", "nvfp4", "scheme"
    __str__, __format__ = str.__str__, str.__format__


FP8, KEEP, PASSTHROUGH = Decision.FP8, Decision.KEEP, Decision.PASSTHROUGH
SCALE_SUFFIXES = ("_scale_inv", "_scale")


@dataclass(frozen=True)
class Rule:
    name: str
    decision: Decision
    pattern: str  # re.search on the tensor name
    why: str


_LAYER = r"(?:^|\.)layers\.\d+\."

# The heuristic table. First match wins; keep-rules come first so a norm or router inside a matching
# block is never quantized. Sources: the official FP8 releases (DeepSeek-V3/V3.2, Qwen3, Qwen3-MoE,
# Qwen3-Next, Qwen3.5, GLM-4.5, MiniMax-M2) as vLLM's and others' loaders read them; the evidence,
# with confidence levels and open questions, is in docs/official_fp8_decisions.md.
RULES: tuple[Rule, ...] = (
    Rule("vision-tower", KEEP, r"(?:^|\.)(?:visual|vision_tower|vision_model|vision_encoder|"
         r"multi_modal_projector|mm_projector)\.", "vision encoders stay in their dtype"),
    Rule("embedding", KEEP, r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|lm_head|output_layer|"
         r"shared_head\.head)\.weight$", "embedding lookups and the output head"),
    Rule("norm", KEEP, r"(?:norm|layernorm)[^.]*\.(?:weight|bias)$", "norms are numerically sensitive"),
    Rule("router", KEEP, r"(?:\.(?:mlp|block_sparse_moe)\.gate\.weight|e_score_correction_bias|"
         r"shared_expert_gate\.weight)$", "MoE routers, expert-score biases, shared-expert gates"),
    Rule("ssm", KEEP, r"\.(?:A_log|D|dt_bias|conv1d\.weight|conv1d\.bias)$", "SSM / conv parameters"),
    Rule("mtp-fc", KEEP, r"^(?:model\.)?mtp\.fc\.weight$", "Qwen3-Next/3.5 MTP fusion projection (bf16 in releases)"),
    Rule("mtp-eh-proj", KEEP, r"(?:^|\.)eh_proj\.weight$", "DeepSeek/GLM MTP hidden-state projection (bf16 in releases)"),
    Rule("linear-attention-gates", KEEP, r"\.linear_attn\.in_proj_(?:a|b|ba)\.weight$",
         "Qwen3-Next/3.5 low-rank decay/gate projections [heads, hidden] (bf16 in releases)"),
    Rule("indexer-weights", KEEP, r"\.indexer\.weights_proj\.weight$", "DeepSeek-V3.2 indexer head weights"),
    Rule("bias", KEEP, r"\.bias$", "biases"),
    Rule("attention", FP8, _LAYER + r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj|qkv_proj|q_a_proj|q_b_proj|"
         r"kv_a_proj_with_mqa|kv_b_proj)\.weight$", "attention projections (MHA/GQA and MLA)"),
    Rule("indexer", FP8, _LAYER + r"self_attn\.indexer\.(?:wq_b|wk)\.weight$", "DeepSeek-V3.2 indexer"),
    Rule("dense-mlp", FP8, _LAYER + r"mlp\.(?:gate_proj|up_proj|down_proj|gate_up_proj)\.weight$", "dense MLP"),
    Rule("moe-expert", FP8, _LAYER + r"(?:mlp|block_sparse_moe)\.experts\.\d+\.(?:gate_proj|up_proj|down_proj|"
         r"w1|w2|w3)\.weight$", "routed experts, one tensor per expert"),
    Rule("fused-experts", FP8, _LAYER + r"mlp\.experts\.(?:gate_up_proj|down_proj)$",
         "routed experts stacked in one 3D tensor [E, out, in]"),
    Rule("shared-expert", FP8, _LAYER + r"mlp\.shared_experts?\.(?:gate_proj|up_proj|down_proj)\.weight$",
         "shared experts"),
    Rule("linear-attention", FP8, _LAYER + r"linear_attn\.(?:in_proj_qkvz|in_proj_qkv|in_proj_z|out_proj)\.weight$",
         "linear-attention wide projections"),
)
DEFAULT_RULE = Rule("unmatched", KEEP, "", "no rule quantizes it")

# Modules a serving engine fuses at load time: all members quantized or none.
FUSED_GROUPS: tuple[tuple[str, str], ...] = (
    ("qkv", r"^(?P<key>.*\.self_attn)\.(?:q_proj|k_proj|v_proj)\.weight$"),
    ("mla-qkv-a", r"^(?P<key>.*\.self_attn)\.(?:q_a_proj|kv_a_proj_with_mqa)\.weight$"),
    ("gate-up", r"^(?P<key>.*)\.(?:gate_proj|up_proj)\.weight$"),
    ("w1-w3", r"^(?P<key>.*)\.(?:w1|w3)\.weight$"),
)

_COMPILED = [(r, re.compile(r.pattern)) for r in RULES]


class ClassificationError(ValueError):
    pass


@dataclass
class Choice:
    decision: Decision
    rule: str  # why, for display only


def heuristic_rule(name: str) -> Rule:
    for rule, rx in _COMPILED:
        if rx.search(name):
            return rule
    return DEFAULT_RULE


def scale_name(name: str) -> str:
    return name + "_scale_inv"


def scale_base(name: str) -> str | None:
    for suffix in SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def quantizable(info: TensorInfo, block_size: tuple[int, int]) -> str | None:
    """Why `info` cannot be an FP8 block weight, or None if it can."""
    if info.dtype not in FLOAT_DTYPES:
        return f"dtype {info.dtype} is not a float"
    if len(info.shape) not in (2, 3):
        return f"{len(info.shape)}D, not a 2D weight or 3D expert stack"
    if min(info.shape[-2:]) < min(block_size):
        return f"a dimension of {list(info.shape)} is smaller than one {block_size[0]}x{block_size[1]} block"
    return None


def classify(
    tensors: dict[str, TensorInfo],
    *,
    block_size: tuple[int, int] = (128, 128),
    reference_names: set[str] | None = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    allow_mismatch: bool = False,
) -> dict[str, Choice]:
    """Decide every tensor; raises ClassificationError for reference mismatches and split fused modules."""
    include_rx = [(p, re.compile(p)) for p in include]
    exclude_rx = [(p, re.compile(p)) for p in exclude]
    ref_quantized = None
    if reference_names is not None:
        ref_quantized = {b for n in reference_names if (b := scale_base(n)) is not None}
        _check_reference_names(tensors, reference_names, allow_mismatch)

    out: dict[str, Choice] = {}
    for name, info in tensors.items():
        if info.dtype in FP8_DTYPES:
            check_fp8_scale(name, info, tensors, block_size)
            out[name] = Choice(PASSTHROUGH, "already-fp8")
            continue
        base = scale_base(name)
        if base is not None and base in tensors and tensors[base].dtype in FP8_DTYPES:
            out[name] = Choice(PASSTHROUGH, "scale-of-fp8")
            continue
        hit = next((f"exclude:{p}" for p, rx in exclude_rx if rx.search(name)), None)
        if hit:
            out[name] = Choice(KEEP, hit)
            continue
        hit = next((f"include:{p}" for p, rx in include_rx if rx.search(name)), None)
        if hit:
            why = quantizable(info, block_size)
            if why:
                raise ClassificationError(f"tensor {name!r} matches {hit} but cannot be quantized: {why}")
            out[name] = Choice(FP8, hit)
            continue
        if ref_quantized is not None:
            if name in ref_quantized:
                why = quantizable(info, block_size)
                if why:
                    raise ClassificationError(f"tensor {name!r} is FP8 in the reference but here {why}")
                out[name] = Choice(FP8, "reference")
            else:
                out[name] = Choice(KEEP, "reference")
            continue
        rule = heuristic_rule(name)
        if rule.decision == FP8 and quantizable(info, block_size):
            out[name] = Choice(KEEP, f"{rule.name}:smaller-than-block" if len(info.shape) >= 2
                                 and info.dtype in FLOAT_DTYPES else f"{rule.name}:not-a-weight")
        else:
            out[name] = Choice(rule.decision, rule.name)
    check_fused_groups(out)
    return out


def check_fp8_scale(name: str, info: TensorInfo, tensors: dict[str, TensorInfo], block_size) -> None:
    """An FP8 weight passed through must come with a scale of its block grid's shape."""
    scale = next((tensors[name + s] for s in SCALE_SUFFIXES if name + s in tensors), None)
    if scale is None:
        raise ClassificationError(f"{info.file.name}: tensor {name!r} is FP8 but has no {name}_scale_inv "
                                  "(nor _scale): it cannot be read back")
    expected = tuple(-(-d // b) for d, b in zip(info.shape[-2:], block_size))
    if len(info.shape) < 2 or tuple(scale.shape[-2:]) != expected or tuple(scale.shape[:-2]) != tuple(info.shape[:-2]):
        raise ClassificationError(f"{scale.file.name}: scale {scale.name!r} has shape {list(scale.shape)}, but FP8 "
                                  f"tensor {name!r} {list(info.shape)} with {block_size[0]}x{block_size[1]} blocks "
                                  f"needs {list(info.shape[:-2]) + list(expected)}")


def fused_group_key(name: str) -> tuple[str, str] | None:
    """(kind, module) of the load-time fused module `name` belongs to, e.g. ("qkv", "...self_attn")."""
    for kind, pattern in FUSED_GROUPS:
        m = re.match(pattern, name)
        if m:
            return kind, m["key"]
    return None


def check_fused_groups(decisions: dict[str, Choice]) -> None:
    """q/k/v, MLA q_a/kv_a, gate/up and w1/w3 of one module: all FP8 or none (engines fuse them)."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in decisions:
        key = fused_group_key(name)
        if key is not None:
            groups[key].append(name)
    problems = []
    for (kind, key), names in groups.items():
        kinds = {decisions[n].decision for n in names}
        if FP8 in kinds and len(kinds) > 1:
            problems.append(f"{key} ({kind}): " + ", ".join(
                f"{n.rsplit('.', 2)[-2]}={decisions[n].decision} [{decisions[n].rule}]" for n in names))
    if problems:
        raise ClassificationError(
            "modules fused at load time must be quantized all or none:\n  " + "\n  ".join(problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def _check_reference_names(tensors, reference_names: set[str], allow_mismatch: bool) -> None:
    ref_weights = {n for n in reference_names if scale_base(n) is None or scale_base(n) not in reference_names}
    only_ref = sorted(ref_weights - set(tensors))
    only_src = sorted(n for n in tensors if n not in ref_weights
                      and not (scale_base(n) is not None and scale_base(n) in tensors))
    if (only_ref or only_src) and not allow_mismatch:
        lines = []
        for label, names in (("only in the reference", only_ref), ("only in the source", only_src)):
            if names:
                lines.append(f"{len(names)} tensor(s) {label}:")
                lines += [f"    {n}" for n in names[:20]]
                if len(names) > 20:
                    lines.append(f"    ... and {len(names) - 20} more")
        raise ClassificationError("source and reference disagree on tensor names (use --allow-mismatch "
                                  "to go on):\n  " + "\n  ".join(lines))
