"""Helpers for checkpoint tests: read outputs back with the safetensors library (an independent reader)."""

import json
import signal
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors import safe_open

from fp8norm.cli import main


def read_dir(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, located through its index when there is one."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        sorted(p.name for p in path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(path / f), "pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = h.get_tensor(k)
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def tree_bytes(path) -> dict[str, bytes]:
    path = Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def cli(*args, ok=True):
    """Run an fp8norm command in-process; with ok=True it must succeed."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def one_line_error(res, *needles, exit_code=1):
    """A failed command: exit code, no traceback, one `Error:` line holding every needle; returns it."""
    assert res.exit_code == exit_code, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def save_tiny_qwen3(path) -> Path:
    """A tiny random Qwen3 (2 layers, hidden 256) saved in bf16 by transformers itself, seed 0."""
    import transformers

    cfg = transformers.Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return Path(path)


def wait_for_pause(flag: Path, proc) -> None:
    """Until a run started with FP8NORM_PAUSE_AT / FP8NORM_PAUSE_FILE=flag holds at its pause point."""
    for _ in range(1200):
        if flag.exists():
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("the run never reached its pause point")


def interrupt_when_paused(run, flag: Path, while_held=lambda: None):
    """SIGINT to `run` once it holds at its pause point, then let it go on (the signal is taken while it
    is held). Returns (what `while_held()` gave just before the signal, stdout, stderr)."""
    try:
        wait_for_pause(flag, run)
        held = while_held()
        run.send_signal(signal.SIGINT)
        time.sleep(1)
        flag.unlink()
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    return held, stdout, stderr


def fail_quantize_at(monkeypatch, n: int, message: str = "injected crash"):
    """The n-th tensor a quantize run computes raises RuntimeError(message); returns what heals it."""
    import fp8norm.pipeline

    real, calls = fp8norm.pipeline.quantize_tensor, []

    def dies(t, xs, plan, dev):
        calls.append(t.name)
        if len(calls) == n:
            raise RuntimeError(message)
        return real(t, xs, plan, dev)

    monkeypatch.setattr(fp8norm.pipeline, "quantize_tensor", dies)
    return lambda: monkeypatch.setattr(fp8norm.pipeline, "quantize_tensor", real)
