#!/usr/bin/env python
"""vLLM's own loader as a check of every output format fp8norm writes; run through tools/vllm_check.sh.

A tiny Qwen3 and a tiny Qwen3-MoE are trained here for a few seconds on a synthetic bigram language
(so greedy tokens have margins), then, per format and model, in a child process: fp8norm writes the
checkpoint (its CLI, as a user would), and vLLM, in stages, each recorded before the next starts:
  config    EngineArgs(...).create_engine_config(): vLLM accepts the quantization config;
  init      the model is built: quantization method and kernel chosen per layer;
  load      the weights are loaded under strict tracking; each checkpoint tensor must be *read* by vLLM's
            loader (a torch function mode sees the tensor used, not just its name passed);
  raw       each weight vLLM holds (fused qkv/gate_up, stacked experts) equals the oracle;
  post      vLLM's post-load processing ran; each linear's effective weight (its kernel applied to an
            identity matrix) equals the oracle rounded to bf16;
  generate  8 prompts batched, 8 greedy tokens each, compared with the bf16 model's, near-ties reported.
The oracle is independent of fp8norm: the formats' formulas transcribed from their specs below (DeepSeek /
compressed-tensors block FP8, per-channel FP8, OCP MX, NVFP4 in the ModelOpt and compressed-tensors
layouts), cross-checked with compressed-tensors' own decompressor for its formats. Without AMX, vLLM's
CPU FP8 GEMMs (AMX-only) are replaced by a dequantize-then-matmul emulation whose block size is the one
vLLM read from the config; nothing else of vLLM is replaced.

Verdicts: PASS, LOADED-NOT-RUN (loaded and equal, but no tokens compared: a crash the bf16 control
shares is vLLM's), NO-KERNEL-HERE (vLLM has no kernel for it on this machine; full reasons),
REJECTED (config or loading), MISMATCH (weights differ from the oracle), DIVERGED (tokens differ from
bf16 beyond near-ties), CRASHED (the run died where the bf16 control did not), ERROR (fp8norm could not
write it). Exit 1 on REJECTED, MISMATCH, DIVERGED, CRASHED or ERROR, and when fewer than --min-compared
cases had their weights compared.

    tools/vllm_check.sh [--formats fp8,fp8-ue8m0,...] [--models qwen3,qwen3-moe] [--keep DIR]
    tools/vllm_check.py --dry-run RESULTS.json     # verdicts and exit code of a recorded run (no vLLM)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# format -> (fp8norm command, source: "bf16" or "fp8", the block-FP8 checkpoint written first)
FORMATS = {
    "fp8": (["quantize", "--to", "fp8"], "bf16"),
    "fp8-ue8m0": (["quantize", "--to", "fp8", "--scale-fmt", "ue8m0"], "bf16"),
    "fp8-ct": (["convert", "--to", "fp8-ct"], "fp8"),
    "fp8-channel": (["quantize", "--to", "fp8-channel"], "bf16"),
    "mxfp8": (["quantize", "--to", "mxfp8"], "bf16"),
    "mxfp4": (["quantize", "--to", "mxfp4"], "bf16"),
    "nvfp4": (["convert", "--to", "nvfp4"], "bf16"),
    "nvfp4-ct": (["convert", "--to", "nvfp4-ct"], "bf16"),
    "bf16": (["convert", "--to", "bf16"], "fp8"),
}
MODELS = ("qwen3", "qwen3-moe")
CONTROL = "bf16-source"  # the trained bf16 model itself: the reference tokens and the crash control
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
KV_CACHE_PARAMS = ("q_scale", "k_scale", "v_scale", "prob_scale", "q_zero_point", "k_zero_point", "v_zero_point")
# How vLLM says it has no kernel for a layer on this machine (kernel selection, not the checkpoint).
NO_KERNEL = re.compile(r"Failed to find a kernel|Unsupported \S+ MoE backend|[Nn]o (CPU )?kernel|"
                       r"not supported on (this|the) (CPU|platform)|requires AMX|is not supported for CPU")
KERNEL_FRAME = re.compile(r"^(init|select|choose)_\w*(kernel|backend)")  # e.g. init_nvfp4_linear_kernel
NEAR_TIE = 0.1  # nats between the bf16 model's top two tokens
FAILING = ("REJECTED", "MISMATCH", "DIVERGED", "CRASHED", "ERROR")
PROMPTS = 8
NEW_TOKENS = 8

# --------------------------------------------------------------------------- verdicts (no torch, no vLLM)


def verdict(case: dict, control: dict | None) -> tuple[str, str]:
    """(kind, one-line detail) of a case's stage records; `control` is the same model's bf16 run."""
    st = case.get("stages", {})
    if "write" in st and not st["write"].get("ok"):
        return "ERROR", f"fp8norm could not write it: {st['write'].get('error')}"
    for stage in ("config", "init", "load", "post"):
        s = st.get(stage)
        if s is not None and not s.get("ok"):
            err = s.get("error", "?")
            in_selection = any(KERNEL_FRAME.search(f.split(":")[-1]) for f in s.get("frames", []))
            if stage in ("init", "post") and (NO_KERNEL.search(err) or in_selection):
                loaded = f" (after loading: {_loaded_text(st)})" if "raw" in st else " (before reading a weight)"
                if st.get("raw", {}).get("mismatched"):
                    return "MISMATCH", f"{_loaded_text(st)}; then no kernel: {err}"
                return "NO-KERNEL-HERE", f"{stage}{loaded}: {err}"
            shared = control is not None and control is not case and \
                control.get("stages", {}).get(stage, {}).get("error") == err
            return "REJECTED", f"{stage}: {err}" + (" (the bf16 control too: vLLM's or this setup's, not the "
                                                    "checkpoint's)" if shared else "")
        if s is None:
            break
    load = st.get("load", {})
    if load.get("unread"):
        return "REJECTED", f"load: checkpoint tensors vLLM's loader never read: {load['unread'][:8]}"
    raw, post = st.get("raw", {}), st.get("post", {})
    if raw.get("mismatched") or raw.get("unmapped") or post.get("mismatched"):
        return "MISMATCH", (f"raw {raw.get('mismatched')}, unmapped {raw.get('unmapped')}, "
                            f"effective {post.get('mismatched')}")
    if not raw.get("compared"):
        return "CRASHED", f"died during {_last_stage(st)} (exit {case.get('returncode')})"
    gen = st.get("generate")
    if gen is None or not gen.get("ok"):
        how = gen.get("error") if gen else f"exit {case.get('returncode')}"
        cgen = (control or {}).get("stages", {}).get("generate")
        if control is not None and (cgen is None or not cgen.get("ok")) and \
                control.get("returncode") == case.get("returncode"):
            return "LOADED-NOT-RUN", f"{_loaded_text(st)}; generation died as the bf16 control's did ({how}): vLLM's"
        return "CRASHED", f"{_loaded_text(st)}; generation died, the bf16 control's did not: {how}"
    cgen = (control or {}).get("stages", {}).get("generate", {})
    if not cgen.get("ok"):
        return "LOADED-NOT-RUN", f"{_loaded_text(st)}; generated, but the bf16 control did not: tokens not compared"
    agree, total, ties, far = compare_tokens(gen["tokens"], cgen["tokens"], cgen["margins"])
    text = (f"{_loaded_text(st)}; tokens {agree}/{total} equal to bf16 ({ties} bf16 near-ties < {NEAR_TIE} nats"
            + (f", {len(far)} differ beyond them: first at prompt {far[0][0]} step {far[0][1]}" if far else "") + ")")
    return ("DIVERGED" if far else "PASS"), text


def compare_tokens(tokens, ref_tokens, ref_margins):
    """(equal, compared, near-ties in the reference, differences not at a near-tie) per prompt, up to the
    first difference of each prompt (after it, the two continue from different prefixes)."""
    agree = total = ties = 0
    far = []
    for p, (got, want, margins) in enumerate(zip(tokens, ref_tokens, ref_margins)):
        for i, (g, w, m) in enumerate(zip(got, want, margins)):
            total += 1
            ties += m < NEAR_TIE
            if g != w:
                if m >= NEAR_TIE:
                    far.append((p, i))
                break
            agree += 1
    return agree, total, ties, far


def _loaded_text(st: dict) -> str:
    load, raw, post = st.get("load", {}), st.get("raw", {}), st.get("post", {})
    text = f"{load.get('read', '?')}/{load.get('tensors', '?')} tensors read, {raw.get('compared', 0)} weights = oracle"
    if post.get("compared"):
        text += f", {post['compared']} effective = oracle"
    return text


def _last_stage(st: dict) -> str:
    return list(st)[-1] if st else "start"


def summarize(results: list[dict], min_compared: int) -> tuple[list[list[str]], int, str]:
    """Table rows, exit code and the closing line of a run's results (the control rows included)."""
    controls = {r["model"]: r for r in results if r["format"] == CONTROL}
    rows, kinds, compared = [], [], 0
    for r in results:
        kind, detail = verdict(r, r if r["format"] == CONTROL else controls.get(r["model"]))
        st = r.get("stages", {})
        compared += bool(st.get("raw", {}).get("compared")) and r["format"] != CONTROL
        kinds.append(kind)
        rows.append([r["model"], r["format"], kind, _yes(st, "config", st.get("config", {}).get("method", "")),
                     _kernels(st), detail])
    failing = sorted({k for k in kinds if k in FAILING})
    code = 1 if failing or compared < min_compared else 0
    line = (f"{compared} cases compared (minimum {min_compared}); "
            + (f"failing: {', '.join(failing)}" if failing else "no REJECTED/MISMATCH/DIVERGED/CRASHED/ERROR")
            + f"; exit {code}")
    return rows, code, line


def _kernels(st: dict) -> str:
    """The kernels after post-load processing (else as built), each emulated one marked."""
    kernels = st.get("post", st.get("init", {})).get("kernels", [])
    for name in st.get("config", {}).get("emulated", []):
        kernels = [k.replace(name, name + "(emulated)") for k in kernels]
    return ", ".join(kernels) or "-"


def _yes(st: dict, stage: str, what: str) -> str:
    s = st.get(stage)
    return "-" if s is None else (what or "yes") if s.get("ok") else "no"


def print_table(rows: list[list[str]]) -> None:
    head = ["model", "format", "verdict", "config (method)", "kernel", "detail"]
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(5)]
    for row in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5].replace("\n", " | "))


# --------------------------------------------------------------------------- oracle (spec formulas, not fp8norm)


def e4m3_values():
    """The 256 OCP FP8 E4M3 (fn) values: bias 7, no infinities, S.1111.111 is NaN."""
    import torch

    vals = []
    for b in range(256):
        sign, exp, man = -1.0 if b & 0x80 else 1.0, (b >> 3) & 0xF, b & 7
        if exp == 15 and man == 7:
            vals.append(float("nan"))
        elif exp == 0:
            vals.append(sign * man / 8 * 2.0 ** -6)
        else:
            vals.append(sign * (1 + man / 8) * 2.0 ** (exp - 7))
    return torch.tensor(vals, dtype=torch.float32)


def e2m1_values():
    """The 16 OCP FP4 E2M1 values: bias 1, one mantissa bit, no NaN or infinity."""
    import torch

    vals = []
    for b in range(16):
        sign, exp, man = -1.0 if b & 8 else 1.0, (b >> 1) & 3, b & 1
        vals.append(sign * (man / 2 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1)))
    return torch.tensor(vals, dtype=torch.float32)


def decode_e4m3(t):
    import torch

    return e4m3_values()[t.contiguous().view(torch.uint8).long()]


def decode_e8m0(t):
    """OCP E8M0 scale: 2^(b - 127), 255 is NaN."""
    import torch

    b = t.contiguous().view(torch.uint8).to(torch.float64)
    return torch.where(b == 255, float("nan"), torch.exp2(b - 127)).float()


def unpack_e2m1(packed):
    """Two E2M1 codes a byte, the first element in the low nibble (compressed-tensors and ModelOpt)."""
    import torch

    p = packed.long()
    codes = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return e2m1_values()[codes]


def expand(scale, rows: int, cols: int, block):
    """Broadcast a [.., R/br, C/bc] scale grid over a [.., rows, cols] weight (partial edge blocks)."""
    br, bc = block
    return scale.repeat_interleave(br, -2)[..., :rows, :].repeat_interleave(bc, -1)[..., :cols]


def linear_group(cfg: dict) -> dict:
    qc = cfg.get("quantization_config") or {}
    for group in (qc.get("config_groups") or {}).values():
        if "Linear" in group.get("targets", []) or len(qc["config_groups"]) == 1:
            return group
    return {}


def spec_dequant(ck: dict, cfg: dict, key: str):
    """The fp32 value of checkpoint weight `key` (`x.weight`, also a fused `...experts.gate_up_proj`) as
    its format's spec defines it, from the config's block/group sizes; None if absent."""
    import torch

    qc = cfg.get("quantization_config") or {}
    stem = key.removesuffix(".weight")
    if stem + ".weight_packed" in ck:  # compressed-tensors FP4: mxfp4 (E8M0 scales) or nvfp4 (E4M3 / global)
        q = unpack_e2m1(ck[stem + ".weight_packed"])
        s = ck[stem + ".weight_scale"]
        group = linear_group(cfg)["weights"]["group_size"]
        scale = decode_e8m0(s) if s.dtype == torch.uint8 else decode_e4m3(s) / ck[stem + ".weight_global_scale"].float()
        return q * expand(scale, *q.shape[-2:], (1, group))
    if key not in ck:
        return None
    w = ck[key]
    if qc.get("quant_method") == "modelopt" and w.dtype == torch.uint8:  # NVFP4: e2m1 * e4m3 * fp32
        q = unpack_e2m1(w)
        scale = decode_e4m3(ck[stem + ".weight_scale"]) * ck[stem + ".weight_scale_2"].float()
        return q * expand(scale, *q.shape[-2:], (1, qc.get("group_size", 16)))
    if w.dtype != torch.float8_e4m3fn:
        return w.float()
    q = decode_e4m3(w)
    rows, cols = q.shape[-2:]
    if qc.get("quant_method") == "fp8":  # DeepSeek layout: W = q * scale_inv per weight_block_size block
        return q * expand(ck[key + "_scale_inv"].float(), rows, cols, qc["weight_block_size"])
    args = linear_group(cfg)["weights"]
    s = ck[key + "_scale"]
    if args["strategy"] == "block":
        return q * expand(s.float(), rows, cols, args["block_structure"])
    if args["strategy"] == "channel":
        return q * s.float().reshape(*q.shape[:-1], 1)
    if args["strategy"] == "group":
        return q * expand(decode_e8m0(s) if s.dtype == torch.uint8 else s.float(), rows, cols, (1, args["group_size"]))
    return q * s.float().reshape(())


def ct_dequant(ck: dict, cfg: dict, key: str):
    """compressed-tensors' own decompressor for `key` (its formats only); None where it does not apply."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return None
    group = linear_group(cfg)
    stem = key.removesuffix(".weight")
    local = {k[len(stem) + 1:]: v for k, v in ck.items() if k.startswith(stem + ".weight")}
    if "weight_scale" not in local:  # not quantized: nothing for the decompressor to say
        return None
    compressor = BaseCompressor.get_value_from_registry(group.get("format") or qc["format"])
    return compressor.decompress(local, QuantizationScheme(**group))["weight"].float()


def oracle_for(ck: dict, cfg: dict, vname: str, decode=spec_dequant):
    """What vLLM's parameter `vname` should hold, by `decode`, with vLLM's fusion and expert stacking."""
    import torch

    module, _, base = vname.rpartition(".")
    if base in ("w13_weight", "w2_weight"):  # stacked experts: [E, 2I, H] (gate rows, then up) / [E, H, I]
        module = module.removesuffix(".routed_experts")
        parts = ("gate_proj", "up_proj") if base == "w13_weight" else ("down_proj",)
        per = []
        for e in range(10_000):
            got = [decode(ck, cfg, f"{module}.{e}.{p}.weight") for p in parts]
            if got[0] is None:
                break
            per.append(torch.cat(got))
        return torch.stack(per) if per else None
    if base != "weight":
        return None
    parent, _, leaf = module.rpartition(".")
    if leaf in STACKED:
        got = [decode(ck, cfg, f"{parent}.{p}.weight") for p in STACKED[leaf]]
        return torch.cat(got) if all(g is not None for g in got) else None
    return decode(ck, cfg, vname)


def vllm_decoded(params: dict, cfg: dict, vname: str):
    """vLLM's raw parameter `vname` with its scales, decoded by the spec formula of the checkpoint's format."""
    module, _, base = vname.rpartition(".")
    local = {f"{module}.weight" + k[len(vname):]: v for k, v in params.items() if k.startswith(vname)}
    if f"{vname}_packed" in params:
        local[f"{module}.weight_packed"] = params[f"{vname}_packed"]
    return spec_dequant(local, cfg, f"{module}.weight")


# --------------------------------------------------------------------------- emulation (no AMX)


def install_emulation() -> list[str]:
    """Replace vLLM's AMX-only CPU FP8 GEMMs (linear: block and per-tensor/channel; MoE) by dequantize-
    then-matmul in torch, keeping vLLM's own post-load processing except the AMX repacking. The block
    size is the one vLLM read from the config (the kernel's weight_group_shape). Returns their names."""
    import torch
    import torch.nn.functional as F
    from vllm.model_executor.kernels.linear.scaled_mm import cpu as lin
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    def scale_of(layer):
        s = getattr(layer, "weight_scale_inv", None)
        return (layer.weight_scale if s is None else s).float()

    def upcast_e8m0(self, layer):
        for name in ("weight_scale_inv", "weight_scale"):
            s = getattr(layer, name, None)
            if s is not None and s.dtype in (torch.uint8, torch.float8_e8m0fnu):
                setattr(layer, name, torch.nn.Parameter(decode_e8m0(s.data), requires_grad=False))

    def block_linear(self, layer, x, bias=None, **kwargs):
        w = layer.weight.float()
        s = expand(scale_of(layer), *w.shape, list(self.weight_group_shape))
        return F.linear(x, (w * s).to(x.dtype), bias)

    def tensor_linear(self, layer, x, bias=None, **kwargs):
        w = layer.weight
        if w.shape[-1] != x.shape[-1]:  # Fp8LinearMethod's (K, N) layout for these kernels
            w = w.t()
        s = scale_of(layer)
        s = s.reshape(()) if s.numel() == 1 else s.reshape(-1, 1)
        return F.linear(x, (w.float() * s).to(x.dtype), bias)

    replaced = []
    for cls, apply in ((lin.CPUFp8BlockScaledMMKernel, block_linear),
                       (lin.CPUFp8PerTensorScaledMMLinearKernel, tensor_linear)):
        cls.is_supported = classmethod(lambda cls, compute_capability=None: (True, None))
        cls.process_weights_after_loading = upcast_e8m0
        cls.apply_weights = apply
        replaced.append(cls.__name__)

    def moe_weights(w, s, block):
        s = s.float()
        if s.numel() == w.shape[0]:
            return w.float() * s.reshape(-1, 1, 1)
        if s.shape[-1] == 1:
            return w.float() * s
        return w.float() * expand(s, *w.shape[-2:], block)

    def moe(self, output, hidden_states, w1, w2, topk_weights, topk_ids, *args, **kwargs):
        qc = self.quant_config  # W8A16: no activation block; the weights' block, as vLLM's own CPU experts read it
        block = qc.block_shape or ([qc._w1.shape.row, qc._w1.shape.col] if qc._w1.shape is not None else (1, 1))
        w13, w2d = moe_weights(w1, self.w1_scale, block), moe_weights(w2, self.w2_scale, block)
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


class Recorder:
    """Appends one JSON line per finished stage to a file, so a crash later keeps what was established."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, stage: str, **fields) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": stage, **fields}, default=str) + "\n")


def failure(e: BaseException) -> dict:
    """The full message (every line: vLLM's reasons) and the innermost frames."""
    frames = [f"{Path(fr.filename).name}:{fr.name}" for fr in traceback.extract_tb(e.__traceback__)[-6:]]
    return {"ok": False, "error": f"{type(e).__name__}: {e}".strip()[:4000], "frames": frames}


def kernels_of(model) -> list[str]:
    """Quantization method, scheme and kernel classes the built model uses, once each."""
    seen = []
    for _, module in model.named_modules():
        qm = getattr(module, "quant_method", None)
        if qm is None or type(qm).__name__ in ("UnquantizedEmbeddingMethod",):
            continue
        parts = [type(qm).__name__]
        for owner in (qm, getattr(module, "scheme", None), getattr(qm, "scheme", None)):
            for attr, val in (vars(owner).items() if owner is not None and hasattr(owner, "__dict__") else ()):
                if val is not None and re.search(r"kernel|experts|backend|scheme|_linear$", attr, re.I):
                    parts.append(getattr(val, "value", None) or type(val).__name__)
        text = "/".join(dict.fromkeys(parts))
        if text not in seen:
            seen.append(text)
    return seen


def write_checkpoint(model_dir: Path, fmt: str, work: Path) -> Path:
    if fmt == CONTROL:
        return model_dir
    cmd, source = FORMATS[fmt]
    src = model_dir if source == "bf16" else write_checkpoint(model_dir, "fp8", work)
    dst = work / f"{model_dir.name}-{fmt}"
    if not (dst / "config.json").exists():
        proc = subprocess.run([sys.executable, "-m", "fp8norm", cmd[0], str(src), str(dst), *cmd[1:], "--overwrite",
                               "-q"], capture_output=True, text=True)
        if proc.returncode not in (0,):
            raise RuntimeError(f"fp8norm {' '.join(cmd)} exited {proc.returncode}: "
                               + (proc.stderr.strip().splitlines() or ["?"])[-1])
    return dst


def run_case(model_dir: Path, fmt: str, work: Path, record: Recorder) -> None:
    try:
        dst = write_checkpoint(model_dir, fmt, work)
    except Exception as e:  # noqa: BLE001 - the case's result
        record("write", **failure(e))
        return
    record("write", ok=True, path=str(dst))
    import torch
    from safetensors.torch import load_file

    import vllm
    import vllm.model_executor.model_loader.base_loader as base_loader
    import vllm.model_executor.model_loader.default_loader as default_loader

    cfg = json.loads((dst / "config.json").read_text())
    ck = {}
    for f in sorted(dst.glob("*.safetensors")):
        ck.update(load_file(f))
    emulated = [] if torch.cpu._is_amx_tile_supported() else install_emulation()
    kwargs = dict(model=str(dst), dtype="bfloat16", enforce_eager=True, max_model_len=128, max_num_seqs=PROMPTS,
                  skip_tokenizer_init=True, model_loader_extra_config={"enable_weights_track": True})
    try:
        engine_config = vllm.EngineArgs(**kwargs).create_engine_config()
    except Exception as e:  # noqa: BLE001
        record("config", **failure(e))
        return
    record("config", ok=True, method=engine_config.model_config.quantization or "none", emulated=emulated)

    stage = {"now": "init"}
    load_weights = default_loader.DefaultModelLoader.load_weights
    process = base_loader.process_weights_after_loading

    def tracked_load(self, model, model_config):
        record("init", ok=True, kernels=kernels_of(model))
        stage["now"] = "load"
        names = {}  # id(tensor) -> checkpoint name, views included
        read = set()
        all_weights = self.get_all_weights

        def recorded(*a, **k):
            for name, t in all_weights(*a, **k):
                names[id(t)] = name
                yield name, t

        class Reads(torch.overrides.TorchFunctionMode):
            METADATA = {"shape", "dtype", "device", "size", "dim", "ndim", "numel", "stride", "is_contiguous",
                        "data_ptr", "element_size", "__len__", "is_floating_point", "requires_grad", "layout"}

            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
                hit = [names[id(a)] for a in flat if isinstance(a, torch.Tensor) and id(a) in names]
                fname = getattr(func, "__name__", str(func))
                if hit and fname not in self.METADATA and "__get__" not in str(func):
                    read.update(hit)
                    if isinstance(out, torch.Tensor) and out.data_ptr() == flat[0].data_ptr():
                        names[id(out)] = hit[0]  # a view: its use is the source tensor's
                        view_refs.append(out)
                return out

        view_refs = []
        self.get_all_weights = recorded
        with Reads():
            load_weights(self, model, model_config)
        record("load", ok=True, tensors=len(ck), read=len(read & set(ck)), unread=sorted(set(ck) - read))
        stage["now"] = "raw"
        compare_raw(model, ck, cfg, record)
        stage["now"] = "post"

    def tracked_process(model, model_config, target_device):
        process(model, model_config, target_device)
        record("post", ok=True, kernels=kernels_of(model), **compare_effective(model, ck, cfg))
        stage["now"] = "engine"

    default_loader.DefaultModelLoader.load_weights = tracked_load
    base_loader.process_weights_after_loading = tracked_process
    try:
        llm = vllm.LLM(**kwargs)
    except Exception as e:  # noqa: BLE001
        record(stage["now"] if stage["now"] != "raw" else "load", **failure(e))
        return
    record("engine", ok=True)
    generate(llm, vllm, record)


def compare_raw(model, ck: dict, cfg: dict, record: Recorder) -> None:
    """vLLM's parameters right after loading, decoded by the spec, against the spec on the checkpoint; the
    checkpoint side also against compressed-tensors' decompressor."""
    import torch

    params = {n: p.detach().cpu() for n, p in model.named_parameters()}
    compared, mismatched, unmapped, ct_checked, ct_differs, ct_error = 0, [], [], 0, [], None
    for name in params:
        want = oracle_for(ck, cfg, name)
        if want is None:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in KV_CACHE_PARAMS and not leaf.startswith(("w13_weight_", "w2_weight_", "weight_", "input_")):
                unmapped.append(name)  # scales are compared through their weights
            continue
        got = vllm_decoded(params, cfg, name)
        compared += 1
        if got is None or got.shape != want.shape or not torch.equal(got, want):
            mismatched.append(name)
        if ct_error is None:
            try:
                ct = oracle_for(ck, cfg, name, decode=ct_dequant)
            except Exception as e:  # noqa: BLE001 - reported, the spec formula stays the oracle
                ct_error = f"{type(e).__name__}: {e}"[:300]
                continue
            if ct is not None:
                ct_checked += 1
                if not torch.equal(ct.to(torch.bfloat16), want.to(torch.bfloat16)):
                    ct_differs.append(name)
    record("raw", ok=True, compared=compared, mismatched=mismatched, unmapped=unmapped,
           ct_decompressor={"compared": ct_checked, "differs_from_spec": ct_differs, "error": ct_error})


def compare_effective(model, ck: dict, cfg: dict) -> dict:
    """After post-load processing: each linear layer's kernel applied to the identity gives the weight it
    effectively uses; it must equal the oracle rounded to bf16 (the kernels' output dtype), within one bf16
    step where the kernel quantizes its input to FP8 (W8A8: the identity's scale enters the product)."""
    import torch

    compared, mismatched, skipped, inexact = 0, [], [], 0
    for name, module in model.named_modules():
        qm = getattr(module, "quant_method", None)
        if qm is None or not hasattr(module, "input_size_per_partition") or not hasattr(qm, "apply"):
            continue
        want = oracle_for(ck, cfg, name + ".weight")
        if want is None:
            skipped.append(name)
            continue
        eye = torch.eye(want.shape[-1], dtype=torch.bfloat16)
        try:
            with torch.no_grad():
                got = qm.apply(module, eye).t().float()
        except Exception as e:  # noqa: BLE001
            mismatched.append(f"{name}: {type(e).__name__}: {e}"[:200])
            continue
        compared += 1
        want = want.to(torch.bfloat16).float()
        if got.shape != want.shape:
            mismatched.append(name)
        elif not torch.equal(got, want):
            inexact += 1
            step = torch.ldexp(torch.ones_like(want), torch.frexp(want)[1] - 8)  # one bf16 ulp of the oracle
            if not bool(((got - want).abs() <= step).all()):
                mismatched.append(name)
    return {"compared": compared, "mismatched": mismatched, "not_compared": skipped, "within_one_bf16_step": inexact}


def prompts() -> list[list[int]]:
    import random

    rng = random.Random(1)
    return [[rng.randrange(4, VOCAB) for _ in range(6)] for _ in range(PROMPTS)]


def generate(llm, vllm, record: Recorder) -> None:
    record("generate-start", ok=True)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts()],
                            vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=2,
                                                detokenize=False), use_tqdm=False)
    except Exception as e:  # noqa: BLE001
        record("generate", **failure(e))
        return
    tokens, margins = [], []
    for o in outs:
        c = o.outputs[0]
        tokens.append(list(c.token_ids))
        margins.append([_margin(step) for step in c.logprobs])
    record("generate", ok=True, tokens=tokens, margins=margins)


def _margin(step: dict) -> float:
    top = sorted((lp.logprob for lp in step.values()), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


# --------------------------------------------------------------------------- tiny trained models

VOCAB = 512


def make_model(kind: str, dst: Path) -> Path:
    """A tiny Qwen3 / Qwen3-MoE trained for a few seconds on a bigram language (each token is followed by
    one of two successors, 3:1), so its greedy tokens have margins of about log 3 nats."""
    import torch
    import transformers

    if (dst / "config.json").exists():
        return dst
    common = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(intermediate_size=512, **common))
    else:
        cfg = transformers.Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=256, num_experts=8,
                                          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    first, second = torch.randperm(VOCAB), torch.randperm(VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        x = torch.empty(32, 24, dtype=torch.long)
        x[:, 0] = torch.randint(VOCAB, (32,))
        for i in range(1, x.shape[1]):
            x[:, i] = torch.where(torch.rand(32) < 0.75, first[x[:, i - 1]], second[x[:, i - 1]])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.to(torch.bfloat16).save_pretrained(dst)
    (dst / "train_loss.txt").write_text(f"{loss.item():.3f}\n")
    return dst


# --------------------------------------------------------------------------- driver


def read_records(path: Path) -> dict:
    stages = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            stages[rec.pop("stage")] = rec
    stages.pop("generate-start", None)
    return stages


def run_all(args) -> list[dict]:
    import torch
    import vllm

    work = Path(args.keep or tempfile.mkdtemp(prefix="fp8norm-vllm-check-"))
    work.mkdir(parents=True, exist_ok=True)
    amx = bool(torch.cpu._is_amx_tile_supported())
    flags = sorted(set(re.findall(r"\b(avx512f|avx512_bf16|amx_tile|amx_bf16|amx_int8)\b",
                                  Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")))
    print(f"vllm {vllm.__version__}, torch {torch.__version__}, CPU flags: {' '.join(flags) or '?'}, "
          f"AMX: {'yes' if amx else 'no'}; work: {work}")
    if not amx:
        print("no AMX on this CPU: vLLM's CPU FP8 GEMMs (linear and MoE) are replaced by a dequantize-then-matmul "
              "emulation; config, kernel selection, loading, fusion and post-load processing are vLLM's own")
    results = []
    for kind in args.models.split(","):
        model_dir = make_model(kind, work / kind)
        print(f"{kind}: trained, final loss {(model_dir / 'train_loss.txt').read_text().strip()}", flush=True)
        for fmt in [CONTROL] + args.formats.split(","):
            rec = work / f"{kind}-{fmt}.records.jsonl"
            rec.unlink(missing_ok=True)
            proc = subprocess.run([sys.executable, __file__, "--model-dir", str(model_dir), "--case-format", fmt,
                                   "--work", str(work), "--record", str(rec)], capture_output=True, text=True,
                                  env=os.environ, cwd=work)  # not the repo: its kernels/ shadows HF `kernels`
            (work / f"{kind}-{fmt}.log").write_text(proc.stdout + proc.stderr)
            res = {"model": kind, "format": fmt, "returncode": proc.returncode, "stages": read_records(rec)}
            control = next((r for r in results if r["model"] == kind and r["format"] == CONTROL), res)
            results.append(res)
            print(f"{kind:<10} {fmt:<12} {verdict(res, control)[0]}", flush=True)
    (work / "vllm_check.json").write_text(json.dumps(results, indent=1))
    print(f"details: {work / 'vllm_check.json'}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--keep", default=None, help="Work directory to keep (default: a temporary one).")
    p.add_argument("--min-compared", type=int, default=6,
                   help="Fewest cases whose weights vLLM loaded and compared for exit code 0 [default: 6].")
    p.add_argument("--dry-run", metavar="RESULTS", help="Verdicts and exit code of a recorded vllm_check.json.")
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--case-format", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case_format:
        run_case(Path(args.model_dir), args.case_format, Path(args.work), Recorder(Path(args.record)))
        return 0
    unknown = set(args.formats.split(",")) - set(FORMATS)
    if unknown:
        p.error(f"--formats: unknown {sorted(unknown)}; known: {','.join(FORMATS)}")
    results = json.loads(Path(args.dry_run).read_text()) if args.dry_run else run_all(args)
    rows, code, line = summarize(results, args.min_compared)
    print_table(rows)
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
