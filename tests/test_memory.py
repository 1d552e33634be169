"""Streaming: peak resident memory stays within about two output shards, whatever the model size.

A subprocess quantizes a 384 MB bf16 checkpoint (12x the 32 MB shard bound). After its imports it
resets the kernel's peak-RSS counter (/proc/self/clear_refs), so VmHWM afterwards minus VmRSS before is
what quantizing cost on top of the interpreter and torch.
"""

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

SHARD = 32_000_000
CHILD = """
import json, re, sys
from fp8norm.quantize import quantize
import fp8norm.reference, tqdm, safetensors

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024

before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
s = quantize(sys.argv[1], sys.argv[2], max_shard_size={shard}, progress=False)
print(json.dumps({{"before": before, "peak": status("VmHWM"), "bytes_in": s.bytes_in}}))
"""


def _write_checkpoint(path, n_files, tensors_per_file, shape):
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for f in range(n_files):
        fname = f"model-{f + 1:05d}-of-{n_files:05d}.safetensors"
        tensors = {}
        for t in range(tensors_per_file):
            name = f"model.layers.{f * tensors_per_file + t}.mlp.down_proj.weight"
            tensors[name] = torch.randn(shape, generator=g).to(torch.bfloat16)
            weight_map[name] = fname
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text("{}")


def _peak(src, dst):
    out = subprocess.run([sys.executable, "-c", CHILD.format(shard=SHARD), str(src), str(dst)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_rss_is_bounded_by_shards_not_model(tmp_path):
    _write_checkpoint(tmp_path / "big", n_files=4, tensors_per_file=12, shape=(2048, 2048))  # 384 MB
    big = _peak(tmp_path / "big", tmp_path / "big-out")
    assert big["bytes_in"] == 48 * 2048 * 2048 * 2
    extra = big["peak"] - big["before"]
    print(f"peak RSS above baseline: {extra / 1e6:.1f} MB for a {big['bytes_in'] / 1e6:.0f} MB model "
          f"(bound 2 shards = {2 * SHARD / 1e6:.0f} MB)")
    assert 0 < extra <= 2 * SHARD, f"{extra / 1e6:.1f} MB above baseline"
    assert big["bytes_in"] >= 10 * SHARD  # the model really is much larger than the bound


def test_both_glibc_thresholds_are_pinned(monkeypatch):
    """mallopt gets the 1 MiB mmap threshold and the trim threshold (kept free memory) once."""
    from fp8norm import _memory, libc

    if not sys.platform.startswith("linux"):
        return
    calls = []
    monkeypatch.setattr(libc, "function", lambda name, argtypes: (lambda p, v: calls.append((p, v)) or 1)
                        if name == "mallopt" else None)
    monkeypatch.setattr(_memory, "_done", False)
    assert _memory.pin_mmap_threshold() is True and _memory.pin_mmap_threshold() is True
    assert calls == [(_memory.M_MMAP_THRESHOLD, 1 << 20), (_memory.M_TRIM_THRESHOLD, _memory.TRIM_BYTES)]
    assert (_memory.M_TRIM_THRESHOLD, _memory.M_MMAP_THRESHOLD) == (-1, -3)  # glibc's malloc.h
