"""Start reading the source while Python is still importing torch.

`import torch` takes 1.1-1.7 s of a command's start here; the engine's first read comes after it. A
command that reads a checkpoint asks the kernel, before that import, to read the first shards into the
page cache (posix_fadvise WILLNEED: the disk works while Python imports, and the engine then reads
from memory). Bounded by `budget_bytes` (what the disk can deliver during the import, at most a fraction
of free memory), so a 700 GB source does not push the page cache out. Nothing here imports torch;
where the call is not available (not Linux) it does nothing.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from . import timing

INDEX_NAME = "model.safetensors.index.json"
BUDGET_BYTES = 4 << 30  # about what NVMe delivers (2.7-7 GB/s) during torch's import


def default_budget() -> int:
    """BUDGET_BYTES, or a quarter of the memory available now where that is less."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return BUDGET_BYTES
    return min(BUDGET_BYTES, available // 4)


class ReadAhead:
    """What a command's read-ahead did: when it started (seconds after fp8norm's start), whether torch
    was loaded then, and the bytes it asked for."""

    def __init__(self):
        self.started_s: float | None = None
        self.torch_loaded: bool | None = None
        self.bytes_requested = 0

    def describe(self) -> str | None:
        """For the `stages` line, or None when nothing was read ahead."""
        if self.started_s is None:
            return None
        when = "after torch was loaded" if self.torch_loaded else "before torch was loaded"
        return f"read-ahead from {self.started_s:.2f} s after start ({when}, {self.bytes_requested / 1e9:.2f} GB)"


LAST = ReadAhead()  # this process's (one command per process)


def source_files(src: str | os.PathLike) -> list[Path]:
    """The safetensors files of `src` in the order the index lists them (the order they are read),
    else by name; [] where `src` is not a local folder (a Hub id) or cannot be read."""
    root = Path(src)
    try:
        index = root / INDEX_NAME
        if index.is_file():
            names = dict.fromkeys(json.loads(index.read_text()).get("weight_map", {}).values())
            return [root / n for n in names]
        return sorted(root.glob("*.safetensors"))
    except (OSError, ValueError, AttributeError):
        return []


def start(src: str | os.PathLike, budget_bytes: int | None = None) -> threading.Thread | None:
    """Ask the kernel to read the first `budget_bytes` of `src`'s shards, on a daemon thread (the
    requests themselves return at once); records LAST. None where there is nothing to do."""
    advise = getattr(os, "posix_fadvise", None)
    files = source_files(src)
    budget_bytes = default_budget() if budget_bytes is None else budget_bytes
    if advise is None or not files or budget_bytes <= 0:
        return None

    def run():
        LAST.started_s, LAST.torch_loaded = timing.since_start(), "torch" in sys.modules
        left = budget_bytes
        for path in files:
            if left <= 0:
                break
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # the command itself names a missing or unreadable file
            try:
                size = os.fstat(fd).st_size
                length = min(size, left)
                advise(fd, 0, length, os.POSIX_FADV_WILLNEED)
                LAST.bytes_requested += length
                left -= length
            except OSError:
                pass
            finally:
                os.close(fd)

    thread = threading.Thread(target=run, name="fp8norm-read-ahead", daemon=True)
    thread.start()
    return thread
