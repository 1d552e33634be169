"""safetensors read and write, one tensor at a time, without mapping whole files.

Reading parses and checks the header (every malformed file gives a SafetensorsError naming it) and
reads a tensor's bytes with one positioned read into a fresh buffer (or one the caller reuses).
Writing lays out the header from a known list of entries first, then streams the tensors in that
order, so a shard never has to be held in memory.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _faults, digest
from .atomic import AtomicFile

# safetensors dtype string <-> torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as one; the message names the file (and tensor)."""


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


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
        return DTYPES[self.dtype]


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
    if dtype not in DTYPES:
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


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Positioned reads into `view` until it is full or the file ends; the bytes read."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


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
        self._f.write(data)

    def write(self, name: str, t: torch.Tensor) -> int:
        e = self.entries[self._next]
        if name != e.name or DTYPE_NAMES.get(t.dtype) != e.dtype or tuple(t.shape) != e.shape:
            raise RuntimeError(f"{self.final_path}: expected {e.name} {e.dtype} {list(e.shape)}, got {name} "
                               f"{DTYPE_NAMES.get(t.dtype)} {list(t.shape)}")
        _faults.point("tensor-write")
        with self._file.naming_errors():
            self._out(tensor_bytes(t))
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
