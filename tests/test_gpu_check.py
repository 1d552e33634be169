"""tools/gpu_check.sh --dry-run: the one-shot GPU check runs end to end on the CPU (tiny shapes, Triton
interpreter) and writes every field the GPU run will fill, so the script cannot rot between GPU runs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BANDWIDTH_FIELDS = {"op", "shape", "bytes", "kernel_us", "kernel_gbps", "copy_us", "copy_gbps", "pct_of_copy",
                    "method", "eager_us", "x_eager"}
CHECKPOINT_FIELDS = {"bytes", "cp_s", "cp_gbps", "quantize_wall_s", "read_s", "compute_s", "write_s", "x_cp",
                     "quantize_gbps", "device", "hash_s", "fsync_s", "verify_s", "import_s", "repack"}
REPACK_FIELDS = {"wall_s", "read_s", "write_s", "hash_s", "fsync_s", "bytes", "cp_s", "x_cp"}
META_FIELDS = {"date", "gpu", "driver", "torch", "triton", "cuda", "python", "num_warps", "dry_run"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, out, time.monotonic() - t0


def test_dry_run_completes_every_step(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in data["steps"].items()} == {
        s: "ok" for s in ("meta", "correctness", "bandwidth", "checkpoint", "compiled")}, (out / "gpu_check.log").read_text()[-3000:]
    assert "correctness:" in (out / "gpu_check.txt").read_text()
    print(f"dry run: {seconds:.0f} s")  # the GPU-less budget is 3 minutes on an idle machine


def test_every_field_is_filled(dry_run):
    _, out, _ = dry_run
    d = json.loads((out / "gpu_check.json").read_text())
    assert META_FIELDS <= set(d["meta"])
    assert d["uncovered"] == []  # every kernel wrapper with a twin is exercised
    ops = {r["op"] for r in d["correctness"]}
    assert len(ops) >= 6 and all(r["equal"] and r["nan_positions_equal"] for r in d["correctness"]), \
        [r for r in d["correctness"] if not r["equal"]][:5]
    assert any(r["variant"] == "nonfinite-raises" for r in d["correctness"])
    assert any(len(r["shape"]) == 3 for r in d["correctness"])  # 3D (experts)
    for r in d["bandwidth"]:
        assert BANDWIDTH_FIELDS <= set(r), r
    assert {r["op"] for r in d["bandwidth"]} == {r["op"] for r in d["correctness"] if r["variant"] != "nonfinite-raises"}
    assert {r["op"] for r in d["wrapper_overhead"]} == {r["op"] for r in d["bandwidth"]}
    assert d["torch_compile"] and all("x_compile" in r and "error" not in r for r in d["torch_compile"])
    assert CHECKPOINT_FIELDS <= set(d["checkpoint"]) and d["checkpoint"]["bytes"] > 0
    assert REPACK_FIELDS <= set(d["checkpoint"]["repack"]) and d["checkpoint"]["repack"]["bytes"] > 0
    assert isinstance(d["compiled_kernels"], list)  # filled on a GPU (the CPU interprets: nothing compiled)


def test_a_failed_step_is_recorded_and_the_rest_kept(tmp_path):
    """`mark` records a step that died (what the shell does on a timeout) without losing earlier records."""
    tool = [sys.executable, str(REPO / "tools" / "gpu_check.py")]
    subprocess.run(tool + ["meta", "--dry-run", "--out", str(tmp_path)], check=True, cwd=REPO, timeout=300)
    subprocess.run(tool + ["mark", "bandwidth", "timed out after 90s", "90", "--out", str(tmp_path)], check=True,
                   cwd=REPO, timeout=300)
    d = json.loads((tmp_path / "gpu_check.json").read_text())
    assert d["steps"]["meta"]["status"] == "ok" and d["steps"]["bandwidth"]["status"] == "timed out after 90s"
    assert d["meta"]["dry_run"] is True
    assert "bandwidth: timed out" in (tmp_path / "gpu_check.txt").read_text()
