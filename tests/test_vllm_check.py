"""tools/vllm_check.py's verdicts and exit codes over a recorded run (--dry-run): no vLLM needed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "vllm_check.py"

LOADED = {"write": {"ok": True}, "config": {"ok": True, "method": "fp8"},
          "init": {"ok": True, "kernels": ["Fp8LinearMethod"]},
          "load": {"ok": True, "tensors": 39, "read": 39, "unread": []},
          "raw": {"ok": True, "compared": 19, "mismatched": [], "unmapped": []},
          "post": {"ok": True, "compared": 10, "mismatched": []}, "engine": {"ok": True}}
REF_TOKENS = [[5, 6, 7], [8, 9, 10]]
REF_MARGINS = [[1.0, 1.0, 1.0], [0.05, 1.0, 1.0]]  # prompt 1's first token is a near-tie


def case(fmt, model="qwen3", returncode=0, **stages):
    base = dict(LOADED)
    for stage, value in stages.items():
        if value is None:
            base.pop(stage, None)
        else:
            base[stage] = value
    return {"model": model, "format": fmt, "returncode": returncode, "stages": base}


def generated(tokens, margins=REF_MARGINS):
    return {"generate": {"ok": True, "tokens": tokens, "margins": margins}}


MX_REASONS = "ValueError: Failed to find a kernel that can implement the ScaledMM linear layer. Reasons: \nA: no\nB: no"
RECORDED = [
    case("bf16-source", **generated(REF_TOKENS)),
    case("fp8", **generated(REF_TOKENS)),                                          # PASS
    case("fp8-ue8m0", **generated([[5, 6, 7], [99, 9, 10]])),                      # PASS: differs at a near-tie
    case("fp8-ct", **generated([[5, 6, 99], [8, 9, 10]])),                         # DIVERGED
    case("mxfp8", load=None, raw=None, post=None, engine=None,
         init={"ok": False, "error": MX_REASONS}),                                  # NO-KERNEL-HERE, before loading
    case("fp8-channel", post={"ok": False, "error": "ValueError: Unsupported FP8 MoE backend: NONE"},
         engine=None),                                                              # NO-KERNEL-HERE, after loading
    case("mxfp4", model="qwen3-moe", load=None, raw=None, post=None, engine=None,  # NO-KERNEL-HERE by its frame
         init={"ok": False, "error": "ValueError: Forced kernel K is not supported: K not available",
               "frames": ["compressed_tensors.py:get_scheme", "__init__.py:init_nvfp4_linear_kernel"]}),
    case("nvfp4", init=None, load=None, raw=None, post=None, engine=None,
         config={"ok": False, "error": "ValueError: Unknown quantization method: modelopt"}),  # REJECTED config
    case("nvfp4-ct", raw=None, post=None, engine=None,
         load={"ok": False, "error": "ValueError: Following weights were not initialized from checkpoint: {'x'}"}),
    case("mxfp4", load={"ok": True, "tensors": 39, "read": 37, "unread": ["a.weight_scale", "b.weight_scale"]}),
    case("bf16", raw={"ok": True, "compared": 19, "mismatched": ["model.layers.0.mlp.down_proj.weight"],
                      "unmapped": []}),                                             # MISMATCH
    case("fp8", model="qwen3-moe", returncode=-4),                                 # shares the control's crash
    case("bf16-source", model="qwen3-moe", returncode=-4),
    case("fp8-ct", model="qwen3-moe", returncode=-11),                             # CRASHED: not the control's
    {"model": "qwen3-moe", "format": "fp8-channel", "returncode": 0,
     "stages": {"write": {"ok": False, "error": "exited 1: Error: x"}}},
]
EXPECTED = {
    ("qwen3", "fp8"): "PASS", ("qwen3", "fp8-ue8m0"): "PASS", ("qwen3", "fp8-ct"): "DIVERGED",
    ("qwen3", "mxfp8"): "NO-KERNEL-HERE", ("qwen3", "fp8-channel"): "NO-KERNEL-HERE",
    ("qwen3", "nvfp4"): "REJECTED", ("qwen3", "nvfp4-ct"): "REJECTED", ("qwen3", "mxfp4"): "REJECTED",
    ("qwen3", "bf16"): "MISMATCH", ("qwen3-moe", "fp8"): "LOADED-NOT-RUN", ("qwen3-moe", "fp8-ct"): "CRASHED",
    ("qwen3-moe", "fp8-channel"): "ERROR", ("qwen3-moe", "mxfp4"): "NO-KERNEL-HERE",
}


def dry_run(tmp_path, results, *args):
    path = tmp_path / "vllm_check.json"
    path.write_text(json.dumps(results))
    proc = subprocess.run([sys.executable, str(TOOL), "--dry-run", str(path), *args], capture_output=True, text=True)
    rows = {}
    for line in proc.stdout.splitlines()[1:-1]:
        model, fmt, kind = line.split()[:3]
        rows.setdefault((model, fmt), kind)
    return proc, rows


def test_every_verdict_kind_and_its_detail(tmp_path):
    proc, rows = dry_run(tmp_path, RECORDED)
    assert rows == {**EXPECTED, ("qwen3", "bf16-source"): "PASS", ("qwen3-moe", "bf16-source"): "LOADED-NOT-RUN"}
    out = proc.stdout
    assert "A: no\nB: no" not in out  # one line a row, yet every reason line is there
    mx = next(line for line in out.splitlines() if " mxfp8 " in line)
    assert "init (before reading a weight): ValueError: Failed to find a kernel" in mx and "A: no" in mx and "B: no" in mx
    channel = next(line for line in out.splitlines() if line.startswith("qwen3 ") and " fp8-channel " in line)
    assert "post (after loading: 39/39 tensors read, 19 weights = oracle" in channel
    ue = next(line for line in out.splitlines() if " fp8-ue8m0 " in line)
    assert "tokens 3/4 equal to bf16 (1 bf16 near-ties" in ue  # prompt 1 stops at its first difference
    assert "differ beyond them: first at prompt 0 step 2" in next(
        line for line in out.splitlines() if line.startswith("qwen3 ") and " fp8-ct " in line)
    assert "never read: ['a.weight_scale', 'b.weight_scale']" in out
    assert "vLLM's" in next(line for line in out.splitlines() if line.split()[:2] == ["qwen3-moe", "fp8"])
    assert proc.stdout.splitlines()[-1] == (
        "8 cases compared (minimum 6); failing: CRASHED, DIVERGED, ERROR, MISMATCH, REJECTED; exit 1")
    assert proc.returncode == 1


@pytest.mark.parametrize("minimum, code", [(3, 0), (4, 1)])
def test_exit_zero_only_without_failures_and_enough_compared(tmp_path, minimum, code):
    good = [r for r in RECORDED if (r["model"], r["format"]) in
            {("qwen3", "bf16-source"), ("qwen3", "fp8"), ("qwen3", "fp8-ue8m0"), ("qwen3", "mxfp8"),
             ("qwen3", "fp8-channel"), ("qwen3-moe", "bf16-source")}]
    proc, rows = dry_run(tmp_path, good, "--min-compared", str(minimum))
    # fp8, fp8-ue8m0 and the per-channel case loaded and compared; the MX case never read a weight
    assert proc.stdout.splitlines()[-1] == (
        f"3 cases compared (minimum {minimum}); no REJECTED/MISMATCH/DIVERGED/CRASHED/ERROR; exit {code}")
    assert proc.returncode == code


def test_control_without_tokens_leaves_cases_loaded_not_run(tmp_path):
    control = case("bf16-source", generate={"ok": False, "error": "RuntimeError: boom"})
    proc, rows = dry_run(tmp_path, [control, case("fp8", **generated(REF_TOKENS))], "--min-compared", "1")
    assert rows[("qwen3", "fp8")] == "LOADED-NOT-RUN"
    assert "the bf16 control did not: tokens not compared" in proc.stdout
    assert proc.returncode == 0


def test_a_rejection_the_control_shares_says_so(tmp_path):
    bad = {"ok": False, "error": "ValidationError: Model architectures ['Qwen3MoeForCausalLM'] failed to be inspected"}
    proc, rows = dry_run(tmp_path, [case("bf16-source", config=bad), case("fp8", config=bad)], "--min-compared", "0")
    assert rows == {("qwen3", "bf16-source"): "REJECTED", ("qwen3", "fp8"): "REJECTED"}
    fp8 = next(line for line in proc.stdout.splitlines() if line.split()[:2] == ["qwen3", "fp8"])
    assert fp8.endswith("failed to be inspected (the bf16 control too: vLLM's or this setup's, not the checkpoint's)")
    assert proc.returncode == 1


def test_unknown_format_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--formats", "fp8,fp9"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].endswith("--formats: unknown ['fp9']; known: "
                                                 "fp8,fp8-ue8m0,fp8-ct,fp8-channel,mxfp8,mxfp4,nvfp4,nvfp4-ct,bf16")
