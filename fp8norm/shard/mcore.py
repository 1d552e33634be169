"""Hugging Face <-> Megatron-Core (MCore) model-parallel layout, bf16 or scaled, in one streaming pass.

`hf_to_mcore` splits a Llama/Qwen3-style dense or Qwen3-MoE-style checkpoint over tensor (TP), pipeline
(PP) and expert (EP) parallel ranks under Megatron-Core names; `mcore_to_hf` puts it back together.
`plan_mcore` / `plan_mcore_to_hf` build the job lists and raise a ValueError for every divisibility or
scale-grid problem before anything is written. Other architectures (linear attention, MLA, fused 3-D
experts, shared experts, vision towers, MTP blocks: Qwen3.5, DeepSeek-V3) are refused up front, each kind
named in one line: Megatron-Core builds those from model-specific module specs this mapping does not write.
Execution goes through `shard.jobs.write_rank_files` (the output engine): every rank file is streamed at
once and memory holds one module's source tensors (e.g. one layer's q, k and v) at a time.

Folder layout written by `hf_to_mcore` (DST)::

    DST/latest_checkpointed_iteration.txt        "0" (Megatron's tracker file)
    DST/iter_0000000/mp_rank_{tp:02d}_{pp:03d}/model.safetensors            (ep == 1)
    DST/iter_0000000/mp_rank_{tp:02d}_{pp:03d}_{ep:03d}/model.safetensors   (ep > 1)
    DST/fp8norm_parallel_layout.json             written last (see below)
    DST/config.json, tokenizer files, ...        copied from the source, for the way back

Every (tp, pp, ep) combination gets a file. Non-expert tensors of a stage are in all EP ranks' files
of that (tp, pp); expert weights are not TP-split (expert tensor parallel size 1), so each expert is
in every TP rank's file of its EP rank.

Names (L = layer index local to the stage, K = expert index local to the EP rank):

    embedding.word_embeddings.weight                      first stage; vocab (dim 0) split over TP
    decoder.layers.L.self_attention.linear_qkv.layer_norm_weight    input_layernorm, replicated
    decoder.layers.L.self_attention.linear_qkv.weight     per query group g: q heads of g, k_g, v_g;
                                                          TP ranks take whole query groups
    decoder.layers.L.self_attention.linear_qkv.bias       (q/k/v biases, fused the same way)
    decoder.layers.L.self_attention.{q,k}_layernorm.weight          q_norm / k_norm, replicated
    decoder.layers.L.self_attention.linear_proj.weight    o_proj, row-parallel (dim 1 split)
    decoder.layers.L.mlp.linear_fc1.layer_norm_weight     post_attention_layernorm (dense layers)
    decoder.layers.L.mlp.linear_fc1.weight                TP rank i holds [gate_i; up_i]
    decoder.layers.L.mlp.linear_fc2.weight                down_proj, row-parallel
    decoder.layers.L.pre_mlp_layernorm.weight             post_attention_layernorm (MoE layers)
    decoder.layers.L.mlp.router.weight                    mlp.gate, replicated
    decoder.layers.L.mlp.experts.local_experts.K.linear_fc1.weight  [gate; up] of one expert
    decoder.layers.L.mlp.experts.local_experts.K.linear_fc2.weight  down of one expert
    decoder.layers.L.mlp.experts.linear_fc1.weightK / linear_fc2.weightK   (grouped_gemm=True)
    decoder.final_layernorm.weight                        last stage, replicated
    output_layer.weight                                   last stage; vocab split over TP

Layers go to stages in order (an even split, or `pipeline_layers` counts) and are renumbered from 0 in
each stage; global experts [e*E/ep, (e+1)*E/ep) go to EP rank e as local experts 0..E/ep-1.

Scaled weights (shard/fp8.py) are carried as they are, bytes and scale tiles cut and joined together,
under the MCore weight name plus the source's suffixes: block FP8 (`X` + `X_scale_inv`, blocks from
config `quantization_config.weight_block_size`, default 128x128; or compressed-tensors' `X` + `X_scale`,
blocks from its `block_structure`) and the compressed-tensors schemes of
`quantize --scheme` (fp8-channel `X` + `X_scale` [M, 1]; mxfp8 `X` + `X_scale` [M, N/32]; mxfp4
`X_packed` [M, N/2] + `X_scale`). Every cut must fall on the scale grid: block FP8 on block boundaries,
MX columns on multiples of 32, per-channel rows anywhere (a row-parallel rank keeps the whole [M, 1]
scale). Block FP8 off the grid is an error unless `requant=True`, which dequantizes the sources of that
output tensor only, assembles it and quantizes it again (amax floor `amax_floor`, power-of-two scales
with `scale_fmt="ue8m0"`, scale dtype of the source); the other schemes are never requantized. So HF ->
MCore -> HF is byte-identical for bf16, grid-aligned block FP8 and the three schemes. NVFP4 checkpoints
are refused in one line.

fp8norm_parallel_layout.json::

    {"format": "fp8norm-mcore-layout", "version": 1, "producer": {...},
     "iteration": 0, "iter_dir": "iter_0000000",
     "tp": T, "pp": P, "ep": E, "expert_tensor_parallel": 1, "grouped_gemm": bool,
     "num_layers": N, "pipeline_layers": [n_0, ...],
     "stages": [{"pp_rank": s, "first_layer": a, "num_layers": n, "embedding": bool, "output": bool}],
     "experts": null | {"num_experts": E_total, "per_rank": E_total/E,
                        "ownership": [{"ep_rank": e, "first_expert": a, "num_experts": n}]},
     "attention": {"num_attention_heads", "num_query_groups", "head_dim", "hidden_size"},
     "ranks": [{"tp", "pp", "ep", "file": "iter_0000000/mp_rank_.../model.safetensors"}],
     "scheme": "fp8-block" | "fp8-ct" | "fp8-channel" | "mxfp8" | "mxfp4" (from the source checkpoint),
     "fp8": {"block_size": [bm, bn], "weights": [HF names of scaled weights], "requantized":
             ["<file>::<mcore name>"], "amax_epsilon", "scale_fmt"},
     "source": {"config": {config.json}, "tensors": [{"name", "dtype", "shape"}] (source order)}}

`mcore_to_hf` needs only this file and the rank files: it replans the same mapping from the stored
source tensor table, checks every rank file holds what the plan expects, and reads each HF tensor's
pieces from the first replica (TP rank 0 / EP rank 0 where replicated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..kernels.numerics import fp8_block as nx
from ..engine import Job, RunStats
from ..checkpoint import INDEX_NAME, SINGLE_NAME, SourceCheckpoint, open_checkpoint, pack_greedy, read_json, shard_name
from .. import digest
from ..output import MANIFEST_NAME, PROVENANCE_NAME, fingerprint, index_text, json_text, provenance
from ..plan import config_block_size
from ..sizes import parse_size
from ..st_io import read_header
from .fp8 import (Cut, Format, Out, QuantOpts, Spec, check_scales, job_of, plan_out, quant_opts, scheme_format,
                  specs_from_table, storage_format)
from .jobs import write_rank_files

__all__ = ["hf_to_mcore", "mcore_to_hf", "plan_mcore", "plan_mcore_to_hf", "McorePlan", "LAYOUT_NAME",
           "LAYOUT_FORMAT", "ITER_DIR", "TRACKER_NAME", "rank_dir", "rank_file"]

LAYOUT_NAME = "fp8norm_parallel_layout.json"
LAYOUT_FORMAT = "fp8norm-mcore-layout"
LAYOUT_VERSION = 1
ITERATION = 0
ITER_DIR = f"iter_{ITERATION:07d}"
TRACKER_NAME = "latest_checkpointed_iteration.txt"
KEY_SEP = "::"  # "<rank file>::<tensor name>": keys of MCore tensors read back by mcore_to_hf

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
SUPPORTED = "Llama/Qwen3 dense and Qwen3-MoE checkpoints (model.layers.N.self_attn / mlp)"
# Modules that Megatron-Core builds from other specs than the GPT decoder layer mapped here (Gated
# DeltaNet, MLA, vision towers, MTP each need a model-specific bridge): refused up front, all named in one
# line, rather than failing on the first layer that lacks q/k/v or a config count that disagrees.
_UNMAPPABLE = (
    ("linear attention", re.compile(r"\.linear_attn\.")),
    ("multi-head latent attention", re.compile(r"\.self_attn\.(q_a_proj|kv_a_proj_with_mqa)\.")),
    ("fused 3-D expert tensors", re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")),
    ("shared experts", re.compile(r"\.mlp\.shared_experts?(_gate)?\.")),
    ("a vision tower", re.compile(r"^(model\.)?(visual|vision_tower|vision_model)\.")),
    ("a multi-token-prediction block", re.compile(r"^mtp\.|\.(eh_proj|enorm|hnorm)\.")),
)


def rank_dir(t: int, s: int, e: int, ep: int) -> str:
    return f"mp_rank_{t:02d}_{s:03d}" + (f"_{e:03d}" if ep > 1 else "")


def rank_file(t: int, s: int, e: int, ep: int) -> str:
    return f"{ITER_DIR}/{rank_dir(t, s, e, ep)}/model.safetensors"


# ----------------------------------------------------------------------------------------------------
# The mapping: which row/column range of which HF tensor lands where in which MCore tensor.


@dataclass(frozen=True)
class Piece:
    """hf[start:stop] along `axis` (the other axis whole) == mcore tensor `mc` of `file`[at:at+len]."""
    hf: str
    axis: int
    start: int
    stop: int
    file: str
    mc: str
    at: int


@dataclass
class Group:
    """One module: HF tensors that are read (or written) together, and all their pieces."""
    rule: str  # how the module is split, for error messages
    hf: list[str]
    pieces: list[Piece] = field(default_factory=list)


@dataclass(frozen=True)
class _Dims:
    heads: int
    groups: int
    head_dim: int
    hidden: int
    layers: int


def _cfg_get(cfg: dict, key: str):
    if cfg.get(key) is not None:
        return cfg[key]
    sub = cfg.get("text_config") or {}
    return sub.get(key)


def _dims(cfg: dict, found_layers: int) -> _Dims:
    heads = _cfg_get(cfg, "num_attention_heads")
    hidden = _cfg_get(cfg, "hidden_size")
    if not isinstance(heads, int) or heads <= 0 or not isinstance(hidden, int) or hidden <= 0:
        raise ValueError("config.json: num_attention_heads and hidden_size (positive ints) are needed to fuse "
                         f"q/k/v for Megatron-Core (got {heads!r}, {hidden!r})")
    groups = _cfg_get(cfg, "num_key_value_heads") or heads
    head_dim = _cfg_get(cfg, "head_dim") or hidden // heads
    layers = _cfg_get(cfg, "num_hidden_layers")
    if layers is None:
        layers = found_layers
    if layers != found_layers:
        raise ValueError(f"config.json: num_hidden_layers={layers}, but the checkpoint has layers "
                         f"0..{found_layers - 1} ({found_layers})")
    if heads % groups:
        raise ValueError(f"config.json: num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={groups}")
    return _Dims(heads, groups, head_dim, hidden, layers)


def _stage_counts(layers: int, pp: int, pipeline_layers) -> list[int]:
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pp must be a positive int, got {pp!r}")
    if pipeline_layers is None:
        if layers % pp:
            raise ValueError(f"num_hidden_layers={layers} cannot be split evenly over pp={pp} pipeline stages; "
                             "give pipeline_layers (--pipeline-layers 8,7,...) with one count per stage")
        return [layers // pp] * pp
    if isinstance(pipeline_layers, str):
        try:
            counts = [int(x) for x in pipeline_layers.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise ValueError(f"pipeline_layers {pipeline_layers!r}: expected comma-separated ints, e.g. 8,7,8")
    else:
        counts = [int(x) for x in pipeline_layers]
    if len(counts) != pp:
        raise ValueError(f"pipeline_layers {counts} has {len(counts)} count(s), pp={pp} needs one per stage")
    if any(c < 1 for c in counts):
        raise ValueError(f"pipeline_layers {counts}: every stage needs at least one layer")
    if sum(counts) != layers:
        raise ValueError(f"pipeline_layers {counts} sums to {sum(counts)}, but the model has "
                         f"num_hidden_layers={layers}")
    return counts


def _check_sizes(tp: int, ep: int) -> None:
    for what, v in (("tp", tp), ("ep", ep)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")


class _Mapper:
    """Builds the Groups for a model described by its HF weights (name -> (dtype, shape), no scales)."""

    def __init__(self, weights: dict[str, tuple[str, tuple]], cfg: dict, tp: int, pp: int, ep: int,
                 pipeline_layers, grouped_gemm: bool):
        _check_sizes(tp, ep)
        self.w, self.tp, self.pp, self.ep, self.gg = weights, tp, pp, ep, grouped_gemm
        self.used: set[str] = set()
        layers: dict[int, dict[str, str]] = {}
        for name in weights:
            m = _LAYER_RE.match(name)
            if m:
                layers.setdefault(int(m[1]), {})[m[2]] = name
        if not layers:
            raise ValueError(f"no tensor is named model.layers.N.* (e.g. {', '.join(list(weights)[:3])}); "
                             f"Megatron-Core's decoder.layers.N.* are mapped from {SUPPORTED}")
        found = max(layers) + 1
        missing = [i for i in range(found) if i not in layers]
        if missing:
            raise ValueError(f"the checkpoint has no tensors for layer(s) {missing} (of 0..{found - 1})")
        self.layers = layers
        self.dims = _dims(cfg, found)
        self.counts = _stage_counts(self.dims.layers, pp, pipeline_layers)
        self.first = [sum(self.counts[:s]) for s in range(pp)]
        self.experts = self._count_experts()
        if self.experts and self.experts % ep:
            raise ValueError(f"{self.experts} experts per MoE layer cannot be spread evenly over ep={ep} "
                             "expert-parallel ranks")
        self.groups: list[Group] = []
        self._build()
        left = [n for n in weights if n not in self.used]
        if left:
            raise ValueError(f"{len(left)} tensor(s) have no Megatron-Core mapping (supported: {SUPPORTED}), "
                             f"e.g. {', '.join(left[:5])}")

    # -- helpers ---------------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple:
        return tuple(self.w[name][1])

    def take(self, name: str) -> str:
        self.used.add(name)
        return name

    def files(self, s: int, t: int | None = None, e: int | None = None) -> list[tuple[int, str]]:
        """(tp rank, file) of stage s, TP-major, optionally only one TP or EP rank."""
        return [(tt, rank_file(tt, s, ee, self.ep)) for tt in range(self.tp) for ee in range(self.ep)
                if (t is None or tt == t) and (e is None or ee == e)]

    def _count_experts(self) -> int:
        counts = set()
        for i, subs in self.layers.items():
            ids = {int(m[1]) for k in subs if (m := _EXPERT_RE.match(k))}
            if ids:
                if ids != set(range(len(ids))):
                    raise ValueError(f"layer {i}: expert indices {sorted(ids)} are not 0..{len(ids) - 1}")
                counts.add(len(ids))
        if len(counts) > 1:
            raise ValueError(f"MoE layers have different expert counts {sorted(counts)}")
        return counts.pop() if counts else 0

    def replicated(self, hf: str, mc: str, s: int, e: int | None = None) -> Group:
        n = self.shape(hf)[0] if self.shape(hf) else 1
        g = Group("replicated on every rank of its stage", [self.take(hf)])
        g.pieces = [Piece(hf, 0, 0, n, f, mc, 0) for _, f in self.files(s, e=e)]
        return g

    def split(self, hf: str, mc: str, s: int, axis: int, what: str) -> Group:
        shape = self.shape(hf)
        n = shape[axis]
        if n % self.tp:
            raise ValueError(f"{hf} {self.w[hf][0]} {list(shape)}: {what} splits dim {axis} ({n}) across "
                             f"tp={self.tp} ranks, and {n} is not divisible by {self.tp}")
        c = n // self.tp
        g = Group(f"{what} splits dim {axis} across tp={self.tp} ranks ({c} per rank)", [self.take(hf)])
        g.pieces = [Piece(hf, axis, t * c, (t + 1) * c, f, mc, 0) for t, f in self.files(s)]
        return g

    def need(self, i: int, sub: str) -> str:
        name = self.layers[i].get(sub)
        if name is None:
            raise ValueError(f"layer {i}: model.layers.{i}.{sub} is missing")
        return name

    # -- the model -------------------------------------------------------------------------------------
    def _build(self) -> None:
        G = self.groups
        if "model.embed_tokens.weight" in self.w:
            G.append(self.split("model.embed_tokens.weight", "embedding.word_embeddings.weight", 0, 0,
                                "the vocabulary-parallel embedding"))
        else:
            raise ValueError("model.embed_tokens.weight is missing")
        for s, count in enumerate(self.counts):
            for j in range(count):
                self._layer(self.first[s] + j, s, f"decoder.layers.{j}")
        last = self.pp - 1
        if "model.norm.weight" not in self.w:
            raise ValueError("model.norm.weight is missing")
        G.append(self.replicated("model.norm.weight", "decoder.final_layernorm.weight", last))
        if "lm_head.weight" in self.w:
            G.append(self.split("lm_head.weight", "output_layer.weight", last, 0,
                                "the vocabulary-parallel output layer"))

    def _layer(self, i: int, s: int, p: str) -> None:
        G, subs = self.groups, self.layers[i]
        att = f"{p}.self_attention"
        G.append(self.replicated(self.need(i, "input_layernorm.weight"), f"{att}.linear_qkv.layer_norm_weight", s))
        G.extend(self._qkv(i, s, att))
        for hf_sub, mc_sub in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
            if f"self_attn.{hf_sub}.weight" in subs:
                G.append(self.replicated(subs[f"self_attn.{hf_sub}.weight"], f"{att}.{mc_sub}.weight", s))
        G.append(self.split(self.need(i, "self_attn.o_proj.weight"), f"{att}.linear_proj.weight", s, 1,
                            "the row-parallel linear_proj"))
        post = self.need(i, "post_attention_layernorm.weight")
        if "mlp.gate.weight" in subs:  # MoE layer
            G.append(self.replicated(post, f"{p}.pre_mlp_layernorm.weight", s))
            G.append(self.replicated(subs["mlp.gate.weight"], f"{p}.mlp.router.weight", s))
            if not self.experts:
                raise ValueError(f"layer {i}: has a router (mlp.gate.weight) but no mlp.experts.*")
            per = self.experts // self.ep
            for k in range(self.experts):
                e, local = divmod(k, per)
                ex = f"mlp.experts.{k}"
                names = [self.need(i, f"{ex}.{w}.weight") for w in ("gate_proj", "up_proj", "down_proj")]
                if self.gg:
                    fc1, fc2 = (f"{p}.mlp.experts.linear_fc1.weight{local}",
                                f"{p}.mlp.experts.linear_fc2.weight{local}")
                else:
                    base = f"{p}.mlp.experts.local_experts.{local}"
                    fc1, fc2 = f"{base}.linear_fc1.weight", f"{base}.linear_fc2.weight"
                G.append(self._fc1(names[0], names[1], fc1, s, tp_split=False, e=e))
                G.append(self.replicated(names[2], fc2, s, e=e))
                G[-1].rule = f"expert {k} goes whole (not TP-split) to ep rank {e} of ep={self.ep}"
        else:
            G.append(self.replicated(post, f"{p}.mlp.linear_fc1.layer_norm_weight", s))
            G.append(self._fc1(self.need(i, "mlp.gate_proj.weight"), self.need(i, "mlp.up_proj.weight"),
                               f"{p}.mlp.linear_fc1.weight", s, tp_split=True))
            G.append(self.split(self.need(i, "mlp.down_proj.weight"), f"{p}.mlp.linear_fc2.weight", s, 1,
                                "the row-parallel linear_fc2"))

    def _fc1(self, gate: str, up: str, mc: str, s: int, *, tp_split: bool, e: int | None = None) -> Group:
        gs, us = self.shape(gate), self.shape(up)
        if gs != us or len(gs) != 2:
            raise ValueError(f"{gate} {list(gs)} and {up} {list(us)}: linear_fc1 fuses gate and up, which must "
                             "be 2-D with the same shape")
        n, tp = gs[0], (self.tp if tp_split else 1)
        if n % tp:
            raise ValueError(f"{gate} {self.w[gate][0]} {list(gs)}: linear_fc1 splits gate and up (dim 0, {n} rows) "
                             f"across tp={tp} ranks, and {n} is not divisible by {tp}")
        c = n // tp
        if tp_split:
            rule = f"linear_fc1 holds [gate_i; up_i] on each of tp={tp} ranks ({c} rows of each per rank)"
        else:
            rule = (f"expert linear_fc1 concatenates gate and up ({c} rows each; experts are whole, "
                    f"on ep rank {e} of ep={self.ep})")
        g = Group(rule, [self.take(gate), self.take(up)])
        for t, f in self.files(s, e=e):
            r = t if tp_split else 0
            g.pieces += [Piece(gate, 0, r * c, (r + 1) * c, f, mc, 0), Piece(up, 0, r * c, (r + 1) * c, f, mc, c)]
        return g

    def _qkv(self, i: int, s: int, att: str) -> list[Group]:
        d, tp = self.dims, self.tp
        hpg = d.heads // d.groups
        out = []
        for kind, mc in (("weight", f"{att}.linear_qkv.weight"), ("bias", f"{att}.linear_qkv.bias")):
            names = [self.layers[i].get(f"self_attn.{x}_proj.{kind}") for x in "qkv"]
            if kind == "bias" and not any(names):
                continue
            if not all(names):
                raise ValueError(f"layer {i}: self_attn q/k/v_proj.{kind}: all three are needed to fuse linear_qkv "
                                 f"(found {[n for n in names if n]})")
            q, k, v = names
            expect = (d.heads * d.head_dim, d.groups * d.head_dim, d.groups * d.head_dim)
            for n, rows in zip(names, expect):
                sh = self.shape(n)
                if not sh or sh[0] != rows or sh[1:] != self.shape(q)[1:]:
                    raise ValueError(
                        f"{n} {list(sh)}: expected {rows} rows (num_attention_heads={d.heads}, num_key_value_heads="
                        f"{d.groups}, head_dim={d.head_dim}) and the same columns as q_proj {list(self.shape(q))}")
            if d.groups % tp:
                raise ValueError(
                    f"{k} {self.w[k][0]} {list(self.shape(k))}: linear_qkv is split across tp={tp} ranks by whole "
                    f"query groups, but num_key_value_heads={d.groups} is not divisible by tp={tp}")
            gpr = d.groups // tp
            g = Group(f"linear_qkv fuses q/k/v per query group ({hpg} q head(s) + k + v, head_dim {d.head_dim}) and "
                      f"splits them across tp={tp} ranks ({gpr} group(s) per rank)", [self.take(n) for n in names])
            qg, hd = hpg * d.head_dim, d.head_dim
            for t, f in self.files(s):
                at = 0
                for grp in range(t * gpr, (t + 1) * gpr):
                    for name, lo, n in ((q, grp * qg, qg), (k, grp * hd, hd), (v, grp * hd, hd)):
                        g.pieces.append(Piece(name, 0, lo, lo + n, f, mc, at))
                        at += n
            out.append(g)
        return out


def _forward_outs(groups: list[Group], specs: dict[str, Spec], opts: QuantOpts) -> list[tuple[Group, list[Out]]]:
    result = []
    for g in groups:
        by_dst: dict[tuple[str, str], list[Cut]] = {}
        for p in g.pieces:
            by_dst.setdefault((p.file, p.mc), []).append(Cut(p.hf, p.start, p.stop, p.at, p.axis))
        result.append((g, [plan_out(f, mc, cuts, specs, g.rule, opts) for (f, mc), cuts in by_dst.items()]))
    return result


# ----------------------------------------------------------------------------------------------------
# HF -> MCore


@dataclass
class McorePlan:
    """Everything decided before a byte is written."""
    ckpt: SourceCheckpoint
    jobs: list[Job]
    layout: dict  # fp8norm_parallel_layout.json (HF -> MCore) or fp8norm.json (MCore -> HF)
    fingerprint: str
    copy_files: list[Path]  # relative to ckpt.root
    requantized: list[str]
    after: dict[str, str] = field(default_factory=dict)  # text files written after the rank files, in order


def _read_config(root: Path) -> dict:
    p = root / "config.json"
    if not p.is_file():
        raise ValueError(f"{root}: config.json is missing (the head counts are needed to fuse q/k/v)")
    return read_json(p, "config.json")


def _refuse_unmappable(root: Path, weights) -> None:
    """One line naming every module kind of `weights` this mapping cannot express, with a tensor of each."""
    found = {}
    for name in weights:
        for what, pattern in _UNMAPPABLE:
            if pattern.search(name):
                found.setdefault(what, name)
    if found:
        kinds = ", ".join(f"{what} ({name})" for what, name in found.items())
        raise ValueError(f"{root}: --layout mcore cannot map {kinds}; it maps {SUPPORTED}")


def plan_mcore(src, *, tp: int, pp: int = 1, ep: int = 1, pipeline_layers=None, grouped_gemm: bool = False,
               requant: bool = False, amax_floor: float | None = None, scale_fmt: str | None = None
               ) -> McorePlan:
    """Plan HF `src` -> Megatron-Core rank files; raises ValueError on any problem (nothing is written)."""
    ckpt = open_checkpoint(src)
    cfg = _read_config(ckpt.root)
    fmt = storage_format(ckpt.root, cfg, ckpt.tensors, config_block_size(cfg, ckpt.root / "config.json"))
    block = fmt.block if fmt.requantizable else nx.DEFAULT_BLOCK_SIZE
    table = {n: (i.dtype, i.shape) for n, i in ckpt.tensors.items()}
    weights, specs = specs_from_table(table, fmt)
    check_scales(ckpt, specs)
    _refuse_unmappable(ckpt.root, weights)
    mapper = _Mapper(weights, cfg, tp, pp, ep, pipeline_layers, grouped_gemm)
    opts = quant_opts(requant, amax_floor, scale_fmt,
                      "Pass requant=True (--requant) to dequantize and requantize the misaligned pieces, or "
                      f"choose a parallel size for which every piece is a multiple of {block[0]}x{block[1]}")
    planned = _forward_outs(mapper.groups, specs, opts)
    jobs = [job_of(g.hf, outs, specs) for g, outs in planned]
    requantized = [f"{o.file}{KEY_SEP}{o.name}" for _, outs in planned for o in outs if o.requant]
    layout = _layout(mapper, cfg, table, specs, fmt, block, requantized, opts)
    copy = [p for p in ckpt.other_files if p.name not in (MANIFEST_NAME, LAYOUT_NAME, TRACKER_NAME)]
    fp = fingerprint({k: v for k, v in layout.items() if k != "producer"})
    return McorePlan(ckpt, jobs, layout, fp, copy, requantized,
                     after={LAYOUT_NAME: json_text(layout), TRACKER_NAME: f"{ITERATION}\n"})


def _layout(m: _Mapper, cfg: dict, table: dict, specs: dict[str, Spec], fmt: Format, block, requantized: list[str],
            opts: QuantOpts) -> dict:
    from .. import __version__

    tp, pp, ep = m.tp, m.pp, m.ep
    experts = None
    if m.experts:
        per = m.experts // ep
        experts = {"num_experts": m.experts, "per_rank": per,
                   "ownership": [{"ep_rank": e, "first_expert": e * per, "num_experts": per} for e in range(ep)]}
    return {
        "format": LAYOUT_FORMAT, "version": LAYOUT_VERSION,
        "producer": {"name": "fp8norm", "version": __version__},
        "iteration": ITERATION, "iter_dir": ITER_DIR,
        "tp": tp, "pp": pp, "ep": ep, "expert_tensor_parallel": 1, "grouped_gemm": bool(m.gg),
        "num_layers": m.dims.layers, "pipeline_layers": m.counts,
        "stages": [{"pp_rank": s, "first_layer": m.first[s], "num_layers": m.counts[s], "embedding": s == 0,
                    "output": s == pp - 1} for s in range(pp)],
        "experts": experts,
        "attention": {"num_attention_heads": m.dims.heads, "num_query_groups": m.dims.groups,
                      "head_dim": m.dims.head_dim, "hidden_size": m.dims.hidden},
        "ranks": [{"tp": t, "pp": s, "ep": e, "file": rank_file(t, s, e, ep)}
                  for t in range(tp) for s in range(pp) for e in range(ep)],
        "scheme": fmt.scheme,
        "fp8": {"block_size": list(block), "weights": [sp.name for sp in specs.values() if sp.scale_key],
                "requantized": requantized, "amax_epsilon": opts.amax_floor,
                "scale_fmt": "ue8m0" if opts.scale_fmt == "ue8m0" else "float"},
        "source": {"config": cfg,
                   "tensors": [{"name": n, "dtype": d, "shape": list(s)} for n, (d, s) in table.items()]},
    }


def _execute(plan: McorePlan, dst, overwrite: bool, progress, resume: bool = False) -> RunStats:
    return write_rank_files(plan.ckpt, plan.jobs, Path(dst), fingerprint=plan.fingerprint, overwrite=overwrite,
                            progress=progress, resume=resume, copy_files=tuple(plan.copy_files), texts=plan.after)


def hf_to_mcore(src, dst, *, tp: int, pp: int = 1, ep: int = 1, pipeline_layers=None, grouped_gemm: bool = False,
                requant: bool = False, amax_floor: float | None = None, scale_fmt: str | None = None,
                overwrite: bool = False, progress: bool | None = None, resume: bool = False) -> RunStats:
    """Write the HF checkpoint `src` as Megatron-Core rank files under `dst` (see the module docstring)."""
    plan = plan_mcore(src, tp=tp, pp=pp, ep=ep, pipeline_layers=pipeline_layers, grouped_gemm=grouped_gemm,
                      requant=requant, amax_floor=amax_floor, scale_fmt=scale_fmt)
    return _execute(plan, dst, overwrite, progress, resume)


# ----------------------------------------------------------------------------------------------------
# MCore -> HF


def _read_layout(root: Path) -> dict:
    p = root / LAYOUT_NAME
    mp_files = sorted(root.glob("model*-mp*.safetensors"))
    if mp_files:
        raise ValueError(f"{root}: holds DeepSeek model-parallel files ({mp_files[0].name}, ...) written by "
                         "`fp8norm shard --layout deepseek`; unshard joins Megatron-Core checkpoints (--layout "
                         "mcore) only. The HF checkpoint they were split from is the joined form (shard only "
                         "reads its source).")
    if not p.is_file():
        raise ValueError(f"{root}: {LAYOUT_NAME} is missing (mcore_to_hf reads layouts written by hf_to_mcore)")
    layout = read_json(p, LAYOUT_NAME)
    if layout.get("format") != LAYOUT_FORMAT or layout.get("version") != LAYOUT_VERSION:
        raise ValueError(f"{p}: not an {LAYOUT_FORMAT} v{LAYOUT_VERSION} file "
                         f"(format {layout.get('format')!r}, version {layout.get('version')!r})")
    return layout


def _mcore_checkpoint(root: Path, layout: dict) -> SourceCheckpoint:
    files, tensors = [], {}
    for r in layout["ranks"]:
        path = root / r["file"]
        if not path.is_file():
            raise ValueError(f"{root}: rank file {r['file']} (tp {r['tp']}, pp {r['pp']}, ep {r['ep']}) is missing")
        files.append(path)
        infos, _ = read_header(path)
        for name, info in infos.items():
            tensors[f"{r['file']}{KEY_SEP}{name}"] = info
    skip_top = {LAYOUT_NAME, TRACKER_NAME, MANIFEST_NAME, layout.get("iter_dir", ITER_DIR)}
    other = sorted(p.relative_to(root) for p in root.rglob("*")
                   if p.is_file() and p.relative_to(root).parts[0] not in skip_top
                   and not (p.parent == root and p.suffix == ".safetensors"))
    return SourceCheckpoint(root, files, tensors, False, other)


TRUST_HINT = "pass --trust-rank-files (check_rank_files=False) to join rank files made or changed elsewhere"


def check_rank_digests(root: Path, files: list[Path]) -> None:
    """Each rank file against the size and digest the shard run recorded for it in its manifest: a
    changed byte would otherwise be joined silently (and found only by a later verify). Manifests of an
    fp8norm before XXH3 record sha256: those are checked with sha256."""
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise ValueError(f"{manifest}: missing, so the rank files cannot be checked against the digests "
                         f"the shard run recorded; {TRUST_HINT}")
    doc = read_json(manifest, "fp8norm manifest")
    kind = doc.get("digest", "sha256")
    if kind not in (digest.ALGORITHM, "sha256"):
        raise ValueError(f"{manifest}: records {kind} digests, which this fp8norm cannot check; {TRUST_HINT}")
    done = doc.get("done")
    for path in files:
        rec = done.get(str(path.relative_to(root))) if isinstance(done, dict) else None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: not listed in {manifest}, so it cannot be checked; {TRUST_HINT}")
        recorded = rec.get("digest" if kind == digest.ALGORITHM else "sha256")
        if path.stat().st_size != rec.get("size") or digest.of_file(path, kind) != recorded:
            raise ValueError(f"{path}: its bytes differ from those the shard run wrote ({kind} recorded in "
                             f"{MANIFEST_NAME}): changed or damaged since; {TRUST_HINT}")


def plan_mcore_to_hf(src, *, requant: bool = False, amax_floor: float | None = None,
                     scale_fmt: str | None = None, max_shard_size="4GB", check_rank_files: bool = True
                     ) -> McorePlan:
    """Plan Megatron-Core rank files written by hf_to_mcore -> one HF checkpoint; checks every rank file
    (and, with `check_rank_files`, its bytes against the shard run's manifest)."""
    opts = quant_opts(requant, amax_floor, scale_fmt, "Pass requant=True to dequantize and requantize it")
    root = Path(src)
    layout = _read_layout(root)
    ckpt = _mcore_checkpoint(root, layout)
    cfg = layout["source"]["config"]
    # layouts written before schemes were recorded are block FP8 or bf16
    fmt = scheme_format(layout.get("scheme", "fp8-block"), tuple(layout["fp8"]["block_size"]))
    table = {t["name"]: (t["dtype"], tuple(t["shape"])) for t in layout["source"]["tensors"]}
    try:
        weights, hf_specs = specs_from_table(table, fmt)
    except ValueError as e:
        raise ValueError(f"{root / LAYOUT_NAME}: the tensors it lists do not fit its scheme {fmt.scheme!r} ({e}): "
                         "the layout was edited, or written for other rank files") from None
    mapper = _Mapper(weights, cfg, layout["tp"], layout["pp"], layout["ep"], layout["pipeline_layers"],
                     layout["grouped_gemm"])
    # What the rank files must hold: the forward plan (requantization allowed) of the stored source table.
    expected = {f"{o.file}{KEY_SEP}{e.name}": e for _, outs in _forward_outs(mapper.groups, hf_specs, QuantOpts(
        True, opts.amax_floor, None, "")) for o in outs for e, _ in o.tensors}
    for key, e in expected.items():
        info, (f, n) = ckpt.tensors.get(key), key.split(KEY_SEP)
        if info is None or (info.dtype, tuple(info.shape)) != (e.dtype, tuple(e.shape)):
            got = "missing" if info is None else f"{info.dtype} {list(info.shape)}"
            raise ValueError(f"{root / f}: tensor {n} is {got}; the layout in {LAYOUT_NAME} expects {e.dtype} "
                             f"{list(e.shape)}")
    extra = [k for k in ckpt.tensors if k not in expected and not k.endswith("._extra_state")]
    if extra:
        raise ValueError(f"{root}: {len(extra)} tensor(s) in the rank files are not part of the layout, "
                         f"e.g. {extra[0].replace(KEY_SEP, ': ')}")
    if check_rank_files:  # after the header checks above, which name what is wrong more closely
        check_rank_digests(root, ckpt.files)
    _, mc_specs = specs_from_table({k: (ckpt.tensors[k].dtype, ckpt.tensors[k].shape) for k in expected}, fmt)
    mc_specs = {k: replace(s, name=s.name.replace(KEY_SEP, ": ")) for k, s in mc_specs.items()}
    check_scales(ckpt, mc_specs)
    if layout["fp8"]["requantized"]:
        opts.hint += " (this layout was written with requantization)"
    planned = []
    for g in mapper.groups:
        outs, sources = [], []
        for hf in g.hf:  # each HF row/column range from its first replica
            cuts, covered = [], 0
            for p in sorted((p for p in g.pieces if p.hf == hf), key=lambda p: (p.start, p.stop, p.file)):
                if p.start == covered and p.stop > covered:
                    cuts.append(Cut(f"{p.file}{KEY_SEP}{p.mc}", p.at, p.at + p.stop - p.start, p.start, p.axis))
                    covered = p.stop
            if covered != (weights[hf][1][cuts[0].axis] if weights[hf][1] else 1):
                raise RuntimeError(f"internal: {hf}: pieces cover {covered} of {list(weights[hf][1])}")
            outs.append(plan_out(None, hf, cuts, mc_specs, g.rule, opts))
            sources += [c.src for c in cuts]
        planned.append((sources, outs))
    # HF shards: source order of tensors, greedy up to max_shard_size.
    limit = parse_size(max_shard_size)
    order = {n: i for i, n in enumerate(weights)}
    all_outs = sorted((o for _, outs in planned for o in outs), key=lambda o: order[o.name])
    shard_of = dict(zip((o.name for o in all_outs), pack_greedy([o.nbytes for o in all_outs], limit)))
    n_shards = max(shard_of.values(), default=0) + 1
    names = [SINGLE_NAME] if n_shards == 1 else [shard_name(i, n_shards) for i in range(n_shards)]
    for _, outs in planned:
        for o in outs:
            o.file = names[shard_of[o.name]]
    jobs = [job_of(sources, outs, mc_specs) for sources, outs in planned]
    requantized = [o.name for _, outs in planned for o in outs if o.requant]
    from .. import __version__

    # fp8norm.json: the source's own (copied into the MCore folder) with this step added, or a new one.
    copy = [p for p in ckpt.other_files if p != Path(PROVENANCE_NAME)]
    prov_src = root / PROVENANCE_NAME
    prov = read_json(prov_src, PROVENANCE_NAME) if prov_src.is_file() else provenance()
    fp = fingerprint({"layout": {k: v for k, v in layout.items() if k != "producer"}, "requant": requant,
                       "pow2": opts.scale_fmt == "ue8m0", "eps": opts.amax_floor, "shards": names})
    prov["mcore_to_hf"] = {"fp8norm_version": __version__,
                           "mcore_layout": {k: layout[k] for k in ("tp", "pp", "ep", "pipeline_layers",
                                                                   "grouped_gemm")},
                           "requantized": requantized, "plan_fingerprint": fp}
    after: dict[str, str] = {}
    if n_shards > 1:
        weight_map = {e.name: names[shard_of[o.name]] for o in all_outs for e, _ in o.tensors}
        after[INDEX_NAME] = index_text(weight_map, sum(o.nbytes for o in all_outs))
    after[PROVENANCE_NAME] = json_text(prov)
    if Path("config.json") not in copy:
        after["config.json"] = json_text(cfg)
    return McorePlan(ckpt, jobs, prov, fp, copy, requantized, after=after)


def mcore_to_hf(src, dst, *, requant: bool = False, amax_floor: float | None = None,
                scale_fmt: str | None = None, max_shard_size="4GB", overwrite: bool = False,
                progress: bool | None = None, resume: bool = False, check_rank_files: bool = True) -> RunStats:
    """Reassemble the Megatron-Core rank files under `src` (written by hf_to_mcore) as an HF checkpoint.
    `check_rank_files`: refuse rank files whose bytes differ from those the shard run recorded."""
    plan = plan_mcore_to_hf(src, requant=requant, amax_floor=amax_floor, scale_fmt=scale_fmt,
                            max_shard_size=max_shard_size, check_rank_files=check_rank_files)
    return _execute(plan, dst, overwrite, progress, resume)
