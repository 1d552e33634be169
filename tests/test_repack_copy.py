"""`repack` copies tensor bytes file to file (fp8norm.engine's copy jobs): the same output, byte for byte,
as reading every tensor and writing it back; the kernel copy and its fallbacks; no torch import."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fp8norm import st_io
from fp8norm.pipeline import Transform, execute_plan
from fp8norm.quantize import repack, repack_plan

from .ckpt_utils import read_dir, same_bytes, tree_bytes


class ReadAndWrite(Transform):
    """The tensor path: every tensor read into memory and written back from it (what repack did)."""

    def apply(self, t, xs, plan, device):
        return xs


def _mixed_checkpoint(root: Path) -> Path:
    """Three source shards of bf16, FP8 weights with their F32 block scales, int and bool tensors, an
    empty tensor, a scalar; an index and a config.json."""
    g = torch.Generator().manual_seed(0)
    shards = {
        "a.safetensors": {
            "model.embed_tokens.weight": torch.randn(96, 64, generator=g).bfloat16(),
            "model.layers.0.mlp.up_proj.weight": torch.randn(256, 128, generator=g).to(torch.float8_e4m3fn),
            "model.layers.0.mlp.up_proj.weight_scale_inv": torch.rand(2, 1, generator=g) + 0.5,
        },
        "b.safetensors": {
            "model.layers.0.position_ids": torch.arange(37, dtype=torch.int64),
            "model.layers.0.empty": torch.empty(0, 16, dtype=torch.bfloat16),
            "model.layers.0.mask": torch.rand(5, 3, generator=g) > 0.5,
            "model.layers.0.norm.weight": torch.randn(64, generator=g).bfloat16(),
        },
        "c.safetensors": {
            "model.layers.1.scalar": torch.tensor(3, dtype=torch.int32),
            "lm_head.weight": torch.randn(300, 64, generator=g).bfloat16(),
        },
    }
    root.mkdir()
    weight_map = {}
    for f, tensors in shards.items():
        save_file(tensors, str(root / f))
        weight_map.update(dict.fromkeys(tensors, f))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (root / "tokenizer.json").write_text("{}")
    return root


@pytest.fixture
def mixed(tmp_path) -> Path:
    return _mixed_checkpoint(tmp_path / "src")


def _tensor_path(src: Path, dst: Path, max_shard_size: str) -> None:
    execute_plan(repack_plan(src, max_shard_size), dst, transform=ReadAndWrite(), device="cpu")


def test_copy_jobs_write_the_bytes_of_the_tensor_path(mixed, tmp_path):
    assert not ReadAndWrite().copies_as_is and Transform().copies_as_is
    repack(mixed, tmp_path / "copied", max_shard_size="40KB")
    _tensor_path(mixed, tmp_path / "read", "40KB")
    copied, read = tree_bytes(tmp_path / "copied"), tree_bytes(tmp_path / "read")
    assert len([f for f in copied if f.endswith(".safetensors")]) >= 3
    assert copied == read  # shards, index, config, the copied files and the manifest (digests included)
    src_t, out_t = read_dir(mixed), read_dir(tmp_path / "copied")  # and the safetensors library agrees
    assert set(src_t) == set(out_t) and all(same_bytes(src_t[k], out_t[k]) for k in src_t)
    assert out_t["model.layers.0.empty"].shape == (0, 16)


def test_kernel_copy_is_used(mixed, tmp_path, monkeypatch):
    copied = []
    real = os.copy_file_range

    def counting(src, dst, count, offset_src=None, *a):
        copied.append(count)
        return real(src, dst, count, offset_src, *a)

    monkeypatch.setattr(os, "copy_file_range", counting)
    repack(mixed, tmp_path / "o", max_shard_size="40KB")
    tensors = read_dir(mixed)
    # every non-empty tensor went through the kernel, none through a read
    assert sum(copied) == sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("refused", [["copy_file_range"], ["copy_file_range", "sendfile"]])
def test_refused_kernel_copy_falls_back_to_the_same_bytes(mixed, tmp_path, monkeypatch, refused):
    used = []

    def refuse(name, err):
        def f(*a, **k):
            used.append(name)
            raise OSError(err, os.strerror(err))
        return f

    monkeypatch.setattr(os, "copy_file_range", refuse("copy_file_range", errno.EXDEV))
    if "sendfile" in refused:
        monkeypatch.setattr(os, "sendfile", refuse("sendfile", errno.EINVAL))
    repack(mixed, tmp_path / "o", max_shard_size="40KB")
    assert set(used) == set(refused)
    monkeypatch.undo()
    _tensor_path(mixed, tmp_path / "read", "40KB")
    assert tree_bytes(tmp_path / "o") == tree_bytes(tmp_path / "read")


def test_copy_range_errors_other_than_refusal_are_raised(tmp_path, monkeypatch):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.write_bytes(b"x" * 100)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    with open(src, "rb") as s, open(dst, "wb") as d, pytest.raises(OSError) as e:
        st_io.copy_range(s.fileno(), d.fileno(), 0, 100, src)
    assert e.value.errno == errno.ENOSPC


def test_copy_range_names_a_short_source(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.write_bytes(b"x" * 100)
    with open(src, "rb") as s, open(dst, "wb") as d, pytest.raises(st_io.SafetensorsError) as e:
        st_io.copy_range(s.fileno(), d.fileno(), 60, 50, src)
    assert str(e.value) == f"{src}: ends 10 bytes short of a tensor (file truncated?)"
    assert dst.read_bytes() == b"x" * 40


def test_repack_never_imports_torch(mixed, tmp_path):
    """The whole command in a fresh interpreter, a --resume after a source's mtime changed (its bytes
    are re-read and compared) included: torch is never imported (`python -X importtime` lists it), nor
    numpy (the few scales are checked in plain Python) or tqdm (no bar is shown)."""
    dst = tmp_path / "o"
    script = (f"import os, sys\nfrom fp8norm.cli import main\n"
              f"for extra in ([], ['--resume', '--threads', '1']):\n"
              f"    try:\n        main(['repack', {str(mixed)!r}, {str(dst)!r}, '--max-shard-size', '40KB', '-q', *extra])\n"
              f"    except SystemExit as e:\n        assert e.code == 0, e.code\n"
              f"    if not extra:\n        os.utime({str(mixed / 'a.safetensors')!r})\n"
              f"print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')))")
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "[]"
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "fp8norm.engine" in imported and "fp8norm.source_checks" in imported
    assert not imported & {"torch", "numpy", "tqdm"}, imported & {"torch", "numpy", "tqdm"}
    _tensor_path(mixed, tmp_path / "read", "40KB")
    assert tree_bytes(dst) == tree_bytes(tmp_path / "read")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu])
def test_the_scale_bit_rule_is_finite_and_positive(tmp_path, dtype):
    """source_checks.scales_positive_finite (bits as unsigned integers) against torch's isfinite & > 0,
    value by value, on the edge values of each dtype."""
    from fp8norm.source_checks import scales_positive_finite

    if dtype == torch.float8_e8m0fnu:  # codes: every one but 255 is 2^(e - 127) > 0
        cases = {c: c != 255 for c in (0, 1, 127, 254, 255)}
        values = {c: torch.tensor([c], dtype=torch.uint8).view(dtype) for c in cases}
    else:
        finfo = torch.finfo(dtype)
        edge = [finfo.max, finfo.tiny, finfo.smallest_normal / 4, 1.0, 0.0, -0.0, -finfo.tiny, -1.0,
                float("inf"), float("-inf"), float("nan")]
        values = {v: torch.tensor([v], dtype=dtype) for v in edge}
        cases = {v: bool(torch.isfinite(t) & (t > 0)) for v, t in values.items()}
        assert sum(cases.values()) == 4  # max, tiny, a subnormal, 1
    for v, t in values.items():
        good = torch.ones(3, 5, dtype=dtype) if dtype != torch.float8_e8m0fnu else \
            torch.full((3, 5), 127, dtype=torch.uint8).view(dtype)
        good.view(-1)[7] = t[0]
        save_file({"s": good}, str(tmp_path / "f.safetensors"))
        info = st_io.read_header(tmp_path / "f.safetensors")[0]["s"]
        assert scales_positive_finite(info) == cases[v], v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu])
def test_read_floats_gives_torchs_values(tmp_path, dtype):
    x = torch.tensor([[1.5, -0.0, float("nan"), float("inf")], [3e-5, 2.0 ** -127, 65504.0, 0.25]])
    if dtype == torch.float8_e8m0fnu:
        x = x.abs().nan_to_num(nan=1.0, posinf=2.0 ** 127)
    t = x.to(dtype)
    if dtype == torch.float8_e8m0fnu:
        t.view(torch.uint8)[0, 2] = 255  # E8M0's NaN
    save_file({"t": t}, str(tmp_path / "f.safetensors"))
    info = st_io.read_header(tmp_path / "f.safetensors")[0]["t"]
    got = torch.from_numpy(st_io.read_floats(info))
    assert torch.equal(got.isnan(), t.float().isnan()) and bool(got.isnan().any())
    assert torch.equal(got.nan_to_num(), t.float().nan_to_num()) and got.shape == t.shape
