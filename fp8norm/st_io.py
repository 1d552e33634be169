"""safetensors read and write, one tensor at a time, without mapping whole files.

Reading parses and checks the header (every malformed file gives a SafetensorsError naming it) and
reads a tensor's bytes with one positioned read into a fresh buffer (or one the caller reuses).
Writing lays out the header from a known list of entries first, then streams the tensors in that
order, so a shard never has to be held in memory.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import functools
from typing import TYPE_CHECKING

from . import _faults, digest, libc
from .atomic import AtomicFile

if TYPE_CHECKING:
    import numpy as np
    import torch

# safetensors dtype string -> (torch dtype name, bytes per element). Reading headers, planning and
# copying tensors need no torch (`fp8norm repack` never imports it): the torch dtypes `DTYPES` and
# `DTYPE_NAMES` are made when first asked for (module __getattr__).
_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
}


@functools.cache
def _torch_dtypes() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    dtypes = {name: getattr(torch, t) for name, (t, _) in _DTYPES.items()}
    return dtypes, {v: k for k, v in dtypes.items()}


def __getattr__(name: str):
    """DTYPES {safetensors dtype: torch dtype} and DTYPE_NAMES (the reverse), importing torch."""
    if name in ("DTYPES", "DTYPE_NAMES"):
        return _torch_dtypes()[name == "DTYPE_NAMES"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as one; the message names the file (and tensor)."""


def itemsize(dtype: str) -> int:
    return _DTYPES[dtype][1]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return _torch_dtypes()[0][self.dtype]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook: a key given twice is an error (json keeps the last one silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ({name: TensorInfo} in file order, __metadata__)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: file too short to be safetensors ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path}: header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise SafetensorsError(f"{path}: header names {e.args[0]!r} twice (a JSON reader would keep only the "
                               "last)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    except RecursionError:
        raise SafetensorsError(f"{path}: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    base = 8 + n
    infos = []
    for name, entry in header.items():
        infos.append(_parse_entry(path, name, entry, base))
    infos.sort(key=lambda i: i.begin)
    pos = base
    for info in infos:
        if info.begin != pos:
            what = "overlaps the previous tensor" if info.begin < pos else "leaves a gap before it"
            raise SafetensorsError(f"{path}: tensor {info.name!r} {what} (offset {info.begin - base})")
        pos = info.end
    if pos != size:
        raise SafetensorsError(f"{path}: tensors cover {pos - base} bytes of a {size - base}-byte buffer"
                               f"{' (truncated file?)' if pos > size else ''}")
    return {i.name: i for i in infos}, metadata


def _parse_entry(path: Path, name: str, entry, base: int) -> TensorInfo:
    def bad(why):
        return SafetensorsError(f"{path}: tensor {name!r}: {why}")

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative ints")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    nbytes = _numel(shape) * itemsize(dtype)
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"shape {shape} of {dtype} needs {nbytes} bytes, data_offsets give {offsets[1] - offsets[0]}")
    return TensorInfo(name, dtype, tuple(shape), path, base + offsets[0], base + offsets[1])


def read_tensor(info: TensorInfo, f=None, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor into fresh (unmapped) memory, or into the uint8 buffer `buf` (at least
    info.nbytes; the tensor is a view of it); `f` is an open binary file to reuse."""
    import torch

    buf = torch.empty(info.nbytes, dtype=torch.uint8) if buf is None else buf[:info.nbytes]
    own = f is None
    if own:
        f = open(info.file, "rb")
    try:
        got = pread_into(f.fileno(), memoryview(buf.numpy()), info.begin) if info.nbytes else 0
    finally:
        if own:
            f.close()
    if got != info.nbytes:
        raise SafetensorsError(f"{info.file}: tensor {info.name!r}: read {got} of {info.nbytes} bytes "
                               "(file truncated?)")
    return buf.view(info.torch_dtype).reshape(info.shape)


def map_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor over a private (copy-on-write) mapping of its bytes: read from the page cache where
    used, never copied into fresh memory as a whole (the check after writing: 1.5-1.9 GB/s for
    read_tensor's copy). Writes to it stay in this process. The mapping goes with the last tensor
    that uses it. A file truncated while it is mapped ends the process (SIGBUS): for files this run
    holds (its source, its locked output), not for whatever verify is given."""
    import torch

    if not info.nbytes:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    with open(info.file, "rb") as f:
        m = MappedTensor(info, f, access=mmap.ACCESS_COPY)  # (its view keeps the mapping alive)
    return torch.frombuffer(m.view, dtype=torch.uint8).view(info.torch_dtype).reshape(info.shape)


def read_bytes(info: TensorInfo) -> bytes:
    """A tensor's bytes, without torch (planning's checks of scales)."""
    with open(info.file, "rb") as f:
        m = MappedTensor(info, f)
        try:
            return bytes(m.view)
        finally:
            m.close()


def read_floats(info: TensorInfo) -> np.ndarray:
    """A float tensor (F64, F32, F16, BF16, F8_E8M0) as float32 numpy values, exactly, without torch
    (planning checks scales and weights with it)."""
    import numpy as np

    raw = np.frombuffer(read_bytes(info), dtype=np.uint8)
    if info.dtype == "BF16":  # the top half of an fp32
        values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif info.dtype == "F8_E8M0":  # 2^(e - 127); e = 255 is NaN
        values = np.where(raw == 255, np.float32("nan"), np.ldexp(np.float32(1), raw.astype(np.int32) - 127))
    elif info.dtype in ("F64", "F32", "F16"):
        values = raw.view({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[info.dtype])
    else:
        raise SafetensorsError(f"{info.file}: tensor {info.name!r} is {info.dtype}, not a float dtype")
    return values.astype(np.float32).reshape(info.shape)


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Positioned reads into `view` until it is full or the file ends; the bytes read."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


class MappedTensor:
    """A source tensor's bytes mapped read-only from its file (`view`): the page cache itself, read
    without a copy into this process. `close()` unmaps it (every view of `view` must be gone)."""

    def __init__(self, info: TensorInfo, f, access: int = mmap.ACCESS_READ):
        self.info = info
        start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY  # mappings start on a page
        if info.end > os.fstat(f.fileno()).st_size:
            raise SafetensorsError(f"{info.file}: tensor {info.name!r}: its bytes end past the end of the file "
                                   "(file truncated?)")
        self._map = mmap.mmap(f.fileno(), info.end - start, access=access, offset=start) \
            if info.nbytes else None
        self.view = memoryview(self._map)[info.begin - start:] if self._map is not None else memoryview(b"")

    def digest(self) -> bytes:
        return digest.of_bytes(self.view)

    def close(self) -> None:
        self.view.release()
        if self._map is not None:
            self._map.close()


# copy_file_range refuses: files on two file systems (EXDEV, before Linux 5.3 and again from 5.19),
# a kernel or file system without it (ENOSYS, EOPNOTSUPP), some file systems and special files (EINVAL)
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


def _copy_file_range(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    return os.copy_file_range(src_fd, dst_fd, count, offset)


def _sendfile(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    return os.sendfile(dst_fd, src_fd, offset, count)


def _pread_write(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    data = os.pread(src_fd, min(count, 1 << 24), offset)
    view = memoryview(data)
    while view:
        view = view[os.write(dst_fd, view):]
    return len(data)


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int, src_path) -> None:
    """Append `count` bytes at `offset` of `src_fd` to `dst_fd` (at its position): copy_file_range
    (the kernel copies, no pass through this process), else sendfile, else read and write, each
    tried when the one before is refused (_NO_KERNEL_COPY)."""
    ways = [_copy_file_range, _sendfile, _pread_write]
    while count:
        try:
            n = ways[0](src_fd, dst_fd, offset, count)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY or len(ways) == 1:
                raise
            ways.pop(0)
            continue
        if n == 0:
            raise SafetensorsError(f"{src_path}: ends {count} bytes short of a tensor (file truncated?)")
        offset, count = offset + n, count - n


# Bytes written between two requests to start their writeback. Measured on this project's 2-core VM
# (ext4): 0.65 GB copied from the page cache then fsynced took 0.51 s, 0.32 s with a request every
# 8 MiB, 0.33 s every 32 MiB, 0.39 s every 64 MiB.
WRITEBACK_BYTES = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2


class Writeback:
    """Starts the disk write of a file's bytes while the file is still being written (Linux
    sync_file_range with SYNC_FILE_RANGE_WRITE: start, do not wait), WRITEBACK_BYTES at a time, so
    the closing fsync finds little left to do and writing overlaps the disk. Where there is no such
    call, or it fails, nothing happens: the fsync still writes (and reports) everything."""

    def __init__(self, fd: int):
        self.fd, self.sent = fd, 0
        self.call = libc.function("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))

    def written(self, end: int) -> None:
        """The file now holds `end` bytes."""
        if self.call is not None and end - self.sent >= WRITEBACK_BYTES:
            self.call(self.fd, self.sent, end - self.sent, _SYNC_FILE_RANGE_WRITE)
            self.sent = end


@dataclass(frozen=True)
class OutEntry:
    """One tensor of an output shard, known before its data exists."""
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * itemsize(self.dtype)


def build_header(entries: list[OutEntry]) -> bytes:
    """The 8-byte length and the JSON header (space-padded to 8 bytes) for tensors in this order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor of any dtype (fp8 included)."""
    import torch

    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """Writes a shard's header, then its tensors in header order, into an fp8norm.atomic.AtomicFile:
    `commit()` puts it under `final_path` once complete. `digest` is the file's digest (fp8norm.digest,
    computed as the bytes go out, from the tensors' own memory);
    `hash_s` and `fsync_s` the seconds spent hashing and in fsync. OSErrors name the file."""

    def __init__(self, final_path: Path, entries: list[OutEntry]):
        self.final_path = Path(final_path)
        self.entries = entries
        self._next = 0
        self._hash = digest.new()
        self.digest = ""
        self.hash_s = 0.0
        self._file = AtomicFile(self.final_path, label="shard")
        self._f = self._file.file
        self._pos = 0  # bytes handed to the file
        self._writeback = Writeback(self._f.fileno())
        try:
            with self._file.naming_errors():
                self._out(build_header(entries))
        except BaseException:
            self._file.abort()
            raise

    @property
    def fsync_s(self) -> float:
        return self._file.fsync_s

    def _out(self, data) -> None:
        t0 = time.perf_counter()
        self._hash.update(data)
        self.hash_s += time.perf_counter() - t0
        data = memoryview(data).cast("B")
        for i in range(0, len(data), WRITEBACK_BYTES):
            self._f.write(data[i:i + WRITEBACK_BYTES])
            self._advance(min(WRITEBACK_BYTES, len(data) - i))

    def _advance(self, n: int) -> None:
        self._pos += n
        self._writeback.written(self._pos)

    def write(self, name: str, t: torch.Tensor) -> int:
        """Write the next tensor from its memory; returns its bytes."""
        return self._put(name, _torch_dtypes()[1].get(t.dtype), tuple(t.shape), lambda: self._out(tensor_bytes(t)))

    def copy(self, name: str, src: MappedTensor, src_fd: int) -> int:
        """Write the next tensor as the bytes of `src` in the file open as `src_fd`, copied by the
        kernel (copy_range); the digest reads them through the mapping (the page cache, no copy)."""
        info = src.info

        def out():
            t0 = time.perf_counter()
            self._hash.update(src.view)
            self.hash_s += time.perf_counter() - t0
            self._f.flush()  # the header and any tensor written through the file object come first
            for i in range(0, info.nbytes, WRITEBACK_BYTES):
                n = min(WRITEBACK_BYTES, info.nbytes - i)
                copy_range(src_fd, self._f.fileno(), info.begin + i, n, info.file)
                self._advance(n)

        return self._put(name, info.dtype, info.shape, out)

    def _put(self, name: str, dtype: str | None, shape: tuple[int, ...], out: Callable[[], None]) -> int:
        e = self.entries[self._next]
        if name != e.name or dtype != e.dtype or shape != e.shape:
            raise RuntimeError(f"{self.final_path}: expected {e.name} {e.dtype} {list(e.shape)}, got {name} "
                               f"{dtype} {list(shape)}")
        _faults.point("tensor-write")
        with self._file.naming_errors():
            out()
        self._next += 1
        _faults.point("tensor-written")
        return e.nbytes

    def commit(self) -> None:
        if self._next != len(self.entries):
            raise RuntimeError(f"{self.final_path}: {len(self.entries) - self._next} tensors never written")
        self.digest = self._hash.hexdigest()
        self._file.commit()

    def abort(self) -> None:
        """Drop the unfinished file; never raises (it runs while another error is on its way up)."""
        self._file.abort()
