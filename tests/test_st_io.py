"""fp8norm.st_io against the safetensors library: what ShardWriter writes the library reads, what the
library writes read_header parses, and malformed headers are refused naming the file and tensor."""

import ctypes
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp8norm import digest
from fp8norm.st_io import (OutEntry, SafetensorsError, ShardWriter, build_header, read_header, read_tensor,
                           DTYPE_NAMES)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "a.weight_scale_inv": torch.rand(1, 1, generator=g),
        "b.weight": torch.randn(4, 8, generator=g).to(torch.float8_e4m3fn),
        "b.ids": torch.arange(7, dtype=torch.int32),
        "c.codes": torch.randint(0, 256, (2, 3), dtype=torch.uint8, generator=g),
        "d.empty": torch.zeros(0, 4, dtype=torch.float16),
    }


def _write(path, tensors) -> ShardWriter:
    w = ShardWriter(path, [OutEntry(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
    for n, t in tensors.items():
        w.write(n, t)
    w.commit()
    return w


def test_what_shardwriter_writes_the_safetensors_library_reads(tmp_path):
    tensors = _tensors()
    path = tmp_path / "model.safetensors"
    w = _write(path, tensors)
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == sorted(tensors) and f.metadata() == {"format": "pt"}
        for n, t in tensors.items():
            got = f.get_tensor(n)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(torch.uint8), t.view(torch.uint8))
    assert w.digest == digest.of_file(path)
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_read_header_parses_what_the_library_writes(tmp_path):
    tensors = _tensors()
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    infos, metadata = read_header(path)
    assert metadata == {"k": "v"} and set(infos) == set(tensors)
    for n, t in tensors.items():
        info = infos[n]
        assert (info.dtype, info.shape, info.nbytes) == (DTYPE_NAMES[t.dtype], tuple(t.shape), t.numel() * t.itemsize)
        assert torch.equal(read_tensor(info).view(torch.uint8), t.view(torch.uint8))


def test_build_header_pads_to_8_bytes_and_lays_tensors_end_to_end():
    raw = build_header([OutEntry("x", "BF16", (3,)), OutEntry("y", "F32", (2, 2))])
    n = int.from_bytes(raw[:8], "little")
    assert len(raw) == 8 + n and n % 8 == 0
    assert json.loads(raw[8:]) == {"__metadata__": {"format": "pt"},
                                   "x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
                                   "y": {"dtype": "F32", "shape": [2, 2], "data_offsets": [6, 22]}}


def test_a_tensor_out_of_order_is_refused_and_abort_leaves_nothing(tmp_path):
    path = tmp_path / "m.safetensors"
    w = ShardWriter(path, [OutEntry("x", "F32", (2,)), OutEntry("y", "F32", (2,))])
    with pytest.raises(RuntimeError) as e:
        w.write("y", torch.zeros(2))
    assert str(e.value) == f"{path}: expected x F32 [2], got y F32 [2]"
    w.abort()
    assert os.listdir(tmp_path) == []


def test_commit_before_every_tensor_is_written_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    w = ShardWriter(path, [OutEntry("x", "F32", (2,)), OutEntry("y", "F32", (2,))])
    w.write("x", torch.zeros(2))
    with pytest.raises(RuntimeError, match=f"^{path}: 1 tensors never written$"):
        w.commit()
    w.abort()
    assert os.listdir(tmp_path) == []


def _raw_file(path, header: bytes, data: bytes = b""):
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    (b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
     b"\0" * 4, "header names 'x' twice (a JSON reader would keep only the last)"),
    (b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4,
     "tensor 'x': shape [2] of F32 needs 8 bytes, data_offsets give 4"),
    (b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 2,
     "tensors cover 4 bytes of a 2-byte buffer (truncated file?)"),
    (b'{"x":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "tensor 'x': unknown dtype 'Q4'"),
])
def test_malformed_headers_are_refused_naming_the_file(tmp_path, header, data, message):
    path = _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(SafetensorsError) as e:
        read_header(path)
    assert str(e.value) == f"{path}: {message}"


@pytest.mark.parametrize("available", [True, False], ids=["sync_file_range", "none"])
def test_writeback_is_asked_for_every_8_mib_and_changes_no_byte(tmp_path, monkeypatch, available):
    """Written and kernel-copied tensors alike: writeback requests over consecutive ranges from byte 0,
    each at least WRITEBACK_BYTES, within the file; without the call (not Linux) the same bytes."""
    from fp8norm import libc, st_io
    from fp8norm.st_io import WRITEBACK_BYTES, MappedTensor

    asked = []
    monkeypatch.setattr(libc, "function", lambda name, *a: (lambda fd, off, n, flags: asked.append((off, n, flags)) or 0)
                        if available else None)
    g = torch.Generator().manual_seed(1)
    src = {"big": torch.randint(0, 256, (5 * WRITEBACK_BYTES // 2,), dtype=torch.uint8, generator=g),
           "small": torch.arange(10, dtype=torch.int64)}
    save_file(src, str(tmp_path / "src.safetensors"))
    info = read_header(tmp_path / "src.safetensors")[0]["big"]
    out = {"written": torch.randint(0, 256, (3 * WRITEBACK_BYTES + 5,), dtype=torch.uint8, generator=g),
           "copied": src["big"], "small": src["small"]}
    entries = [OutEntry(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in out.items()]
    w = ShardWriter(tmp_path / "o.safetensors", entries)
    w.write("written", out["written"])
    with open(info.file, "rb") as f:
        m = MappedTensor(info, f)
        w.copy("copied", m, f.fileno())
        m.close()
    w.write("small", out["small"])
    w.commit()
    data = (tmp_path / "o.safetensors").read_bytes()
    assert data == build_header(entries) + b"".join(t.numpy().tobytes() for t in out.values())
    if not available:
        assert asked == []
        return
    assert [o for o, _, _ in asked] == [0] + [o + n for o, n, _ in asked[:-1]]  # consecutive, from 0
    assert all(n >= WRITEBACK_BYTES and flags == st_io._SYNC_FILE_RANGE_WRITE for _, n, flags in asked)
    assert len(data) - WRITEBACK_BYTES < sum(n for _, n, _ in asked) <= len(data) and len(asked) >= 5


def test_sync_file_range_is_found_on_linux():
    from fp8norm import libc

    if not sys.platform.startswith("linux"):
        pytest.skip("Linux's call")
    assert libc.function("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)) is not None
    assert libc.function("no_such_call_here", ()) is None


def test_map_tensor_reads_what_read_tensor_reads_and_writes_nothing_back(tmp_path):
    from fp8norm.st_io import map_tensor

    path = tmp_path / "a.safetensors"
    tensors = _tensors()
    save_file(tensors, str(path))
    before = path.read_bytes()
    infos, _ = read_header(path)
    for name, info in infos.items():
        mapped = map_tensor(info)
        assert mapped.dtype == tensors[name].dtype and mapped.shape == tensors[name].shape, name
        assert torch.equal(mapped.view(torch.uint8), read_tensor(info).view(torch.uint8)), name
        if mapped.numel():
            mapped.view(torch.uint8).fill_(7)  # private: the file keeps its bytes
    assert path.read_bytes() == before
    with open(path, "r+b") as f:
        f.truncate(len(before) - 3)
    last = max(infos.values(), key=lambda i: i.end)
    with pytest.raises(SafetensorsError, match="end past the end of the file"):
        map_tensor(last)
