"""Per-input-channel activation statistics: collected with transformers forward hooks, read by the
rms and mse calibration modes to weight each input channel's error.

File format (JSON):
    {"format": "fp8norm-activation-stats/1", "stat": "mean_square", "tokens": 1234,
     "modules": {"model.layers.0.mlp.down_proj": [E[x_0^2], E[x_1^2], ...], ...}}
A weight tensor `M.weight` (or a fused expert tensor named `M` itself) uses the entry of module `M`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

FORMAT = "fp8norm-activation-stats/1"


def load_activation_stats(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """({module: fp32 weights}, sha256 of the file); raises ValueError naming the file on bad content."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
        modules = doc["modules"]
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
        stats = {name: torch.tensor(values, dtype=torch.float32) for name, values in modules.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an fp8norm activation-stats file ({e})") from None
    for name, w in stats.items():
        if w.dim() != 1 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"{path}: module {name!r}: weights must be a list of finite values >= 0")
    return stats, hashlib.sha256(raw).hexdigest()


def weights_for(stats: dict[str, torch.Tensor] | None, tensor_name: str) -> torch.Tensor | None:
    if not stats:
        return None
    module = tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name
    return stats.get(module)


def collect_activation_stats(model_dir: str | Path, prompts: list[str], *, max_tokens: int = 512,
                             device: str = "auto", dtype: torch.dtype = torch.float32) -> dict:
    """Run `prompts` through the model in `model_dir` and return the stats document (see module doc).

    Hooks every nn.Linear (and transformers' fused expert modules are skipped: their inputs differ
    per expert); the statistic is the mean square of each input channel over all tokens seen.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (KeyError, ValueError, OSError, TypeError) as e:  # e.g. a stub tokenizer.json: KeyError 'added_tokens'
        raise ValueError(f"{model_dir}: its tokenizer cannot be loaded by transformers ({type(e).__name__}: {e}); "
                         "collect-stats needs the model's real tokenizer files (tokenizer.json, "
                         "tokenizer_config.json)") from None
    from .device import resolve_device

    device = resolve_device(device)  # auto: the GPU when there is one
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.square().sum(0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    tokens = 0
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = tok(prompt, return_tensors="pt").input_ids[:, :max_tokens].to(device)
                model(ids)
                tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    if not tokens:
        raise ValueError("no prompt produced any token")
    names = checkpoint_module_names(model_dir, sums)
    return {"format": FORMAT, "stat": "mean_square", "tokens": tokens,
            "modules": {names[n]: (sums[n] / counts[n]).tolist() for n in sorted(sums)}}


def checkpoint_module_names(model_dir, modules) -> dict[str, str]:
    """transformers' module name -> the name its weight has in the checkpoint's files.

    They differ where transformers renames on load (e.g. Qwen3.5's `model.language_model.layers.N`
    is `model.layers.N` in Qwen3_5MoeForCausalLM): the stats must carry the file's names, which
    `quantize` looks up. A module maps to the one checkpoint weight whose name ends with its name
    past the leading `model.`; otherwise it keeps its own name."""
    from .checkpoint import open_checkpoint

    weights = [n[: -len(".weight")] for n in open_checkpoint(model_dir).tensors if n.endswith(".weight")]
    present = set(weights)
    out = {}
    for m in modules:
        if m in present:
            out[m] = m
            continue
        tail = m.removeprefix("model.")
        found = [w for w in weights if w.endswith("." + tail)]
        out[m] = found[0] if len(found) == 1 else m
    return out
