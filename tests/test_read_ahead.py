"""The source is read ahead while Python imports torch: which files, in which order, how much, and that a
command starts it before torch is loaded (fp8norm.read_ahead)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fp8norm import read_ahead
from fp8norm.examples import make_example
from tests.ckpt_utils import cli


def shards(tmp_path, sizes: dict[str, int], index_order=None):
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"\0" * size)
    if index_order is not None:
        weight_map = {f"t{i}": name for i, name in enumerate(index_order)}
        (tmp_path / read_ahead.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path


def test_files_come_in_the_index_order_else_by_name(tmp_path):
    src = shards(tmp_path, {"b.safetensors": 1, "a.safetensors": 1})
    assert [p.name for p in read_ahead.source_files(src)] == ["a.safetensors", "b.safetensors"]
    shards(tmp_path, {}, index_order=["b.safetensors", "a.safetensors", "b.safetensors"])
    assert [p.name for p in read_ahead.source_files(src)] == ["b.safetensors", "a.safetensors"]
    assert read_ahead.source_files("Qwen/Qwen3-8B") == []  # a Hub id: nothing local to read


def test_the_first_budget_bytes_are_asked_for_in_reading_order(tmp_path, monkeypatch):
    src = shards(tmp_path, {"a.safetensors": 300, "b.safetensors": 500, "c.safetensors": 700},
                 index_order=["c.safetensors", "a.safetensors", "b.safetensors"])
    asked = []
    monkeypatch.setattr(read_ahead.os, "posix_fadvise",
                        lambda fd, off, n, advice: asked.append((os.readlink(f"/proc/self/fd/{fd}"), off, n, advice)))
    monkeypatch.setattr(read_ahead, "LAST", read_ahead.ReadAhead())
    read_ahead.start(src, budget_bytes=1100).join()
    assert [(os.path.basename(p), off, n) for p, off, n, _ in asked] == [("c.safetensors", 0, 700),
                                                                        ("a.safetensors", 0, 300),
                                                                        ("b.safetensors", 0, 100)]
    assert {a for *_, a in asked} == {os.POSIX_FADV_WILLNEED}
    assert read_ahead.LAST.bytes_requested == 1100
    assert read_ahead.LAST.describe().startswith("read-ahead from ")


def test_nothing_to_read_starts_nothing(tmp_path):
    assert read_ahead.start(tmp_path / "missing") is None
    assert read_ahead.start(shards(tmp_path, {"a.safetensors": 8}), budget_bytes=0) is None


def test_the_budget_is_at_most_a_quarter_of_available_memory():
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert read_ahead.default_budget() <= min(read_ahead.BUDGET_BYTES, available // 4 + (64 << 20))


def test_a_command_reads_ahead_before_torch_is_loaded(tmp_path):
    """In a fresh process, as a user runs it: the stages line says when the read-ahead started."""
    make_example(tmp_path / "bf16")
    res = subprocess.run([sys.executable, "-m", "fp8norm", "quantize", str(tmp_path / "bf16"), str(tmp_path / "fp8"),
                          "--verify-samples", "0", "--device", "cpu"], capture_output=True, text=True, check=True)
    stages = next(line for line in res.stdout.splitlines() if line.startswith("stages"))
    assert "read-ahead from " in stages and "(before torch was loaded, " in stages, stages


@pytest.mark.parametrize("value", ["tpu", "cuda:x", "cpu0", "cuda:", ""])
def test_a_device_that_is_not_one_is_refused_while_parsing(tmp_path, value):
    res = cli("quantize", tmp_path / "src", tmp_path / "dst", "--device", value, ok=False)
    assert res.exit_code == 2 and "expected auto, cpu, cuda or cuda:N" in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_gpu_that_is_not_there_is_refused_by_the_command(tmp_path):
    make_example(tmp_path / "bf16")
    res = cli("quantize", tmp_path / "bf16", tmp_path / "dst", "--device", "cuda:1", ok=False)
    assert res.exit_code == 1 and "--device cuda:1: CUDA is not available on this machine" in res.output
    assert not (tmp_path / "dst").exists()
