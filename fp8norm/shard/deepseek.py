"""DeepSeek model-parallel layout: `model{i}-mp{N}.safetensors` for the reference `model.py` /
`generate.py` (DeepSeek-V3/V3.2/V4), from bf16, block-FP8 or GPTQ/auto-round W4A16 checkpoints.

Names: `model.` dropped, self_attn -> attn, mlp -> ffn, e_score_correction_bias -> bias, the
projection mapping below (q_a_proj -> wq_a, ...), and a scaled weight's scale (`weight_scale_inv`, or
compressed-tensors' `weight_scale`) -> `scale`, mxfp4's `weight_packed` -> `weight`: DeepSeek's Linear
holds `weight` + `scale`, the dtypes telling the format (e4m3 + fp32 block / per-row scales, e4m3 or
packed e2m1 bytes + E8M0 per-32 scales; the scheme is recorded in the layout JSON). Each
mapped module is column-parallel (output dim 0 split), row-parallel (input dim 1 split) or
replicated; routed experts live only on their owner rank (E/N per rank), shared experts and the
router are replicated, and the MTP block's copies of the embedding and head are dropped.

Split rules per storage format:
  bf16/fp16   the weight along its parallel dim
  FP8 block   weight and `scale` together; each split point must fall on a block boundary (the
              checkpoint's quantization_config.weight_block_size, default 128x128)
              (or requant=True dequantizes, splits and requantizes the pieces)
  fp8-channel rows with their scale rows; a column split keeps the whole [N, 1] scale on every rank
  mxfp8/4     rows with their scale rows; columns on multiples of 32 (their scale columns cut at /32,
              mxfp4's bytes at /2), never requantized
  W4A16       qweight [in/8, out], qzeros [in/g, out/8], scales [in/g, out] (stored bf16), g_idx [in]:
              column: out/N and (out/N)/8 whole; row: (in/8)/N and (in/g)/N whole, g_idx rebased
Every rule is checked while planning, before any file is written; errors name the tensor, its
shape, the rule and N.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..checkpoint import open_checkpoint, read_json
from ..output import fingerprint, json_text
from ..plan import config_block_size
from ..engine import Job, RunStats
from ..st_io import DTYPES, OutEntry, TensorInfo, read_tensor
from .fp8 import Cut, Out, QuantOpts, Spec, check_scales, job_of, plan_out, quant_opts, specs_from_table, storage_format
from .jobs import SliceOut, shard_job, write_rank_files

COLUMN, ROW = 0, 1
# HF projection name -> (DeepSeek name, parallel dim: 0 column, 1 row, None replicated)
MAPPING: dict[str, tuple[str, int | None]] = {
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None), "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0), "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0), "o_proj": ("wo", 1), "gate_proj": ("w1", 0),
    "down_proj": ("w2", 1), "up_proj": ("w3", 0), "lm_head": ("head", 0),
    # already-translated names (inference checkpoints)
    "embed": ("embed", 0), "wq_a": ("wq_a", None), "wq_b": ("wq_b", 0), "wkv": ("wkv", None), "wo_a": ("wo_a", 0),
    "wo_b": ("wo_b", 1), "w1": ("w1", 0), "w2": ("w2", 1), "w3": ("w3", 0), "head": ("head", 0),
    "weights_proj": ("weights_proj", 0), "attn_sink": ("attn_sink", 0), "ape": ("ape", None),
}
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
LAYOUT_NAME = "fp8norm_parallel_layout.json"


class ShardError(ValueError):
    pass


@dataclass
class Module:
    """One logical tensor to place: its DeepSeek name, parallel dim and storage parts."""
    name: str  # DeepSeek name of the weight (for GPTQ: the linear's base name)
    dim: int | None
    parts: dict[str, TensorInfo]  # role (weight, scale; GPTQ: qweight, ...) -> source tensor
    expert: int | None = None
    spec: Spec | None = None  # None: GPTQ parts


def rename(hf_name: str) -> tuple[str, int | None] | None:
    """DeepSeek name and parallel dim of an HF tensor name; None for tensors that are dropped."""
    name = hf_name.removeprefix("model.")
    if name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight")):
        return None  # the MTP block shares the main embedding and head
    name = name.replace("self_attn", "attn").replace("mlp", "ffn").replace("e_score_correction_bias", "bias")
    parts = name.split(".")
    key_at = len(parts) - (1 if parts[-1] in ("attn_sink", "ape") else 2)  # the module's name, or the tensor's
    key = parts[key_at] if key_at >= 0 else parts[-1]
    dim = None
    if key in MAPPING:
        parts[key_at], dim = MAPPING[key]
    if "shared_experts" in parts:
        dim = None  # plain Linears in the model: never split
    return ".".join(parts), dim


def _expert_index(name: str) -> int | None:
    m = re.search(r"\.experts\.(\d+)\.", name)
    return int(m[1]) if m and "shared_experts" not in name else None


def collect_modules(tensors: dict[str, TensorInfo], fmt) -> list[Module]:
    """Group source tensors into modules (a weight with its scale in `fmt`, GPTQ parts), in source order."""
    _, specs = specs_from_table({n: (i.dtype, i.shape) for n, i in tensors.items()}, fmt)
    modules: dict[str, Module] = {}
    for key, sp in specs.items():
        r = rename(key)
        if r is None:
            continue
        name, dim = r
        base, _, last = name.rpartition(".")
        if last in GPTQ_PARTS:
            modules.setdefault(base, Module(base, dim, {}, _expert_index(name))).parts[last] = tensors[key]
        else:
            parts = {"weight": tensors[sp.key], **({"scale": tensors[sp.scale_key]} if sp.scale_key else {})}
            modules[name] = Module(name, dim, parts, _expert_index(name), sp)
    return list(modules.values())


def _err(m: Module, info: TensorInfo, rule: str, mp: int) -> ShardError:
    return ShardError(f"{info.file.name}: tensor {info.name!r} {list(info.shape)}: {rule} (mp={mp})")


_EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


def routed_experts_in_config(src) -> int | None:
    """The routed-expert count config.json declares (DeepSeek n_routed_experts, Qwen num_experts,
    Mixtral num_local_experts; top level or text_config), or None."""
    path = Path(src) / "config.json"
    try:
        cfg = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return None
    for scope in (cfg, cfg.get("text_config") or {}):
        for key in _EXPERT_COUNT_KEYS:
            if isinstance(scope.get(key), int):
                return scope[key]
    return None


def plan_deepseek(src, mp: int, n_experts: int | None = None, *, requant: bool = False,
                  amax_floor: float | None = None, scale_fmt: str | None = None) -> tuple[list[Job], dict]:
    """All jobs and the layout description; raises ShardError before anything is written.
    `n_experts` None: from config.json (see routed_experts_in_config)."""
    if mp < 1:
        raise ShardError(f"--mp must be >= 1, got {mp}")
    if n_experts is None:
        n_experts = routed_experts_in_config(src) or 0
    if n_experts % mp:
        raise ShardError(f"--n-experts {n_experts} is not divisible by --mp {mp}")
    ckpt = open_checkpoint(src)
    cfg_path = ckpt.root / "config.json"
    cfg = read_json(cfg_path, "config.json") if cfg_path.is_file() else {}
    fmt = storage_format(ckpt.root, cfg, ckpt.tensors, config_block_size(cfg, cfg_path))
    # the engine carries pieces on the scale grid byte for byte, requantizes off-grid block FP8 (requant=True)
    opts = quant_opts(requant, amax_floor, scale_fmt, "use --requant to dequantize and requantize")
    local = n_experts // mp
    files = [f"model{i}-mp{mp}.safetensors" for i in range(mp)]
    jobs = []
    try:
        modules = collect_modules(ckpt.tensors, fmt)
        check_scales(ckpt, {m.name: m.spec for m in modules if m.spec is not None})
    except ValueError as e:
        raise ShardError(f"{ckpt.root}: {e}") from None
    for m in modules:
        info = next(iter(m.parts.values()))
        if m.spec is None:
            missing = [p for p in ("qweight", "qzeros", "scales") if p not in m.parts]
            if missing:
                raise ShardError(f"{info.file.name}: W4A16 linear {m.name!r} has no {', '.join(missing)} "
                                 f"(a qweight/qzeros/scales triple is needed to split it; mp={mp})")
        if m.expert is not None:
            if m.expert >= n_experts:
                if not n_experts:
                    raise ShardError(f"{info.file.name}: tensor {info.name!r} is a routed expert, but config.json "
                                     f"gives no expert count ({' / '.join(_EXPERT_COUNT_KEYS)}): pass "
                                     "--n-experts N (routed experts in the model)")
                raise ShardError(f"{info.file.name}: tensor {info.name!r}: expert {m.expert} >= --n-experts {n_experts}")
            ranks, dim = [m.expert // local], None
        else:
            ranks, dim = list(range(mp)), m.dim
        if m.spec is None:
            jobs.append(shard_job([i.name for i in m.parts.values()], [
                SliceOut(files[r], entry, fn) for r in ranks for entry, fn in _gptq_outputs(m, dim, r, mp)]))
        else:
            jobs.append(job_of([m.name], [_split(m, dim, r, mp, files[r], opts) for r in ranks], {m.name: m.spec}))
    layout = {"layout": "deepseek", "mp": mp, "n_experts": n_experts, "scheme": fmt.scheme, "files": files,
              "expert_owner": {str(e): e // local for e in range(n_experts)}}
    return jobs, layout


def _piece(n: int, mp: int, rank: int) -> slice:
    step = n // mp
    return slice(rank * step, (rank + 1) * step)


def _narrow(t: torch.Tensor, dim: int, sl: slice) -> torch.Tensor:
    return t.narrow(dim, sl.start, sl.stop - sl.start)


def _split(m: Module, dim, rank, mp, file: str, opts: QuantOpts) -> Out:
    """Rank `rank`'s piece of a plain or scaled weight (whole when `dim` is None), under DeepSeek's names."""
    sp, w = m.spec, m.parts["weight"]
    names = {"weight": m.name, "scale": m.name.removesuffix(".weight") + ".scale"}
    if dim is None or dim >= len(sp.shape):
        return Out(file, m.name, [(OutEntry(names[role], i.dtype, i.shape), lambda s, n=i.name: s[n])
                                  for role, i in m.parts.items()])
    if sp.shape[dim] % mp:
        raise _err(m, w, f"dim {dim} ({sp.shape[dim]}) is not divisible by the model-parallel size", mp)
    sl = _piece(sp.shape[dim], mp, rank)
    try:
        out = plan_out(file, m.name, [Cut(m.name, sl.start, sl.stop, 0, dim)], {m.name: sp}, f"split over mp={mp}",
                       opts)
    except ValueError as e:
        raise ShardError(f"{w.file.name}: tensor {w.name!r} {list(w.shape)}: {e}") from None
    out.tensors = [(replace(e, name=n), make) for n, (e, make) in zip(names.values(), out.tensors)]
    return out


def _gptq_outputs(m: Module, dim, rank, mp):
    """qweight, qzeros and scales each cut into mp pieces along `dim`'s axis of their own (column-parallel:
    out, out/8 and out columns; row-parallel: in/8 rows and groups), scales stored bf16; g_idx whole for
    column-parallel, cut and rebased to the rank's own groups for row-parallel."""
    qw, qz, sc = m.parts["qweight"], m.parts["qzeros"], m.parts["scales"]
    gi = m.parts.get("g_idx")
    (in_packed, out), n_groups = qw.shape, sc.shape[0]
    if dim == COLUMN and out % mp:
        raise _err(m, qw, f"column-parallel: out_features {out} is not divisible by the model-parallel size", mp)
    if dim == COLUMN and (out // mp) % 8:
        raise _err(m, qz, f"column-parallel: each rank's {out // mp} output columns are not a multiple of 8, "
                          "so qzeros (8 outputs per int32) cannot be split", mp)
    if dim == ROW and in_packed % mp:
        raise _err(m, qw, f"row-parallel: qweight's {in_packed} packed input rows (in_features/8) are not "
                          "divisible by the model-parallel size", mp)
    if dim == ROW and n_groups % mp:
        raise _err(m, sc, f"row-parallel: {n_groups} quantization groups (in_features/group_size) are not "
                          "divisible by the model-parallel size", mp)
    axis = {COLUMN: 1, ROW: 0}.get(dim)
    for part, dtype in ((qw, qw.dtype), (qz, qz.dtype), (sc, "BF16")):
        sl = slice(0, part.shape[0]) if axis is None else _piece(part.shape[axis], mp, rank)
        shape = tuple(sl.stop - sl.start if d == axis else n for d, n in enumerate(part.shape))
        yield (OutEntry(f"{m.name}.{part.name.rpartition('.')[2]}", dtype, shape),
               lambda s, n=part.name, d=axis or 0, sl=sl, t=DTYPES[dtype]: _narrow(s[n], d, sl).to(t))
    if gi is None:
        return
    if dim != ROW:
        yield OutEntry(f"{m.name}.g_idx", gi.dtype, gi.shape), lambda s, n=gi.name: s[n]
        return
    isl, gsl = _piece(gi.shape[0], mp, rank), _piece(n_groups, mp, rank)
    local = _narrow(read_tensor(gi), 0, isl).long() - gsl.start  # checked now, before any write
    if bool(((local < 0) | (local >= gsl.stop - gsl.start)).any()):
        raise _err(m, gi, f"row-parallel: g_idx maps rank {rank}'s inputs to other ranks' groups (act-order), "
                          "so it cannot be split", mp)
    yield (OutEntry(f"{m.name}.g_idx", gi.dtype, (gi.shape[0] // mp,)),
           lambda s, n=gi.name, isl=isl, off=gsl.start: (_narrow(s[n], 0, isl) - off).to(s[n].dtype))


def shard_deepseek(src, dst, *, mp: int, n_experts: int | None = None, requant: bool = False,
                   amax_floor: float | None = None, scale_fmt: str | None = None,
                   overwrite: bool = False, progress=None, resume: bool = False) -> RunStats:
    """Write DST/model{i}-mp{mp}.safetensors for i in 0..mp-1 (see the module docstring);
    `n_experts` None: config.json's routed-expert count. With `requant`, off-grid block-FP8 pieces are
    requantized with `amax_floor` and `scale_fmt` (as hf_to_mcore does)."""
    jobs, layout = plan_deepseek(src, mp, n_experts, requant=requant, amax_floor=amax_floor, scale_fmt=scale_fmt)
    ckpt = open_checkpoint(src)
    settings = {"amax_floor": amax_floor, "scale_fmt": scale_fmt} if requant else {}
    fp = fingerprint({"mp": mp, "n_experts": layout["n_experts"], "requant": requant, **settings,
                      "tensors": [[n, i.dtype, list(i.shape)] for n, i in ckpt.tensors.items()]})
    return write_rank_files(ckpt, jobs, Path(dst), texts={LAYOUT_NAME: json_text(layout)}, fingerprint=fp,
                            overwrite=overwrite, copy_files=("tokenizer.json", "tokenizer_config.json"),
                            progress=progress, resume=resume)
