"""Read buffers the engine reuses instead of allocating one per tensor.

A fresh buffer is fresh pages: with glibc's mmap threshold pinned (fp8norm._memory) each tensor read
into new memory faults in every page, which made reading from the page cache run at 1.4 GB/s where a
read into memory already touched runs at 5.3 GB/s (2-core development machine, 1.5 GB of bf16).
The pool hands out buffers and takes them back once nothing else refers to their memory. It holds
(handed out + idle) no more than the most it ever had handed out at once, and at most `keep_bytes`:
so it is never larger than the buffers fresh allocation would have had alive at the peak.

A buffer comes back only when its storage has no other user: an output that is the input tensor
itself (repack, kept tensors) or a view a computation kept still holds it, and the buffer is then
left to be freed when they go. The check uses torch's storage use count (`torch._C`, private): where
a torch lacks it, nothing is reused (the engine reads into fresh memory as before).
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SMALL = 1 << 20  # below glibc's pinned mmap threshold: heap memory, already cheap


@functools.cache
def _use_count():
    import torch  # when first needed: an engine that copies tensors (repack) never imports torch

    return getattr(torch._C, "_storage_Use_Count", None)


def _unshared(base: torch.Tensor) -> bool:
    # the base tensor and the storage object made for the query are the only users
    use_count = _use_count()
    return use_count is not None and use_count(base.untyped_storage()._cdata) <= 2


class BufferPool:
    def __init__(self, keep_bytes: int):
        self.keep_bytes = keep_bytes
        self._idle: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}  # id -> buffer handed out
        self._lent_bytes = 0
        self._peak_lent = 0  # the most handed out at once: what fresh allocation would have peaked at
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least `nbytes` (at most twice as large): slice what you need."""
        import torch

        if nbytes < SMALL or _use_count() is None:
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            # (indices, not list.remove: == on tensors compares elements)
            fits = [i for i, b in enumerate(self._idle) if nbytes <= b.numel() <= 2 * nbytes]
            buf = self._idle.pop(min(fits, key=lambda i: self._idle[i].numel())) if fits else None
            if buf is None:
                # make room first: idle buffers that did not fit are dropped (their pages go back)
                while self._idle and self._idle_bytes() + self._lent_bytes + nbytes > self._limit(nbytes):
                    self._idle.pop(max(range(len(self._idle)), key=lambda i: self._idle[i].numel()))
            self._lent_bytes += buf.numel() if buf is not None else nbytes
            self._peak_lent = max(self._peak_lent, self._lent_bytes)
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            self._lent[id(buf)] = buf
        return buf

    def give_back(self, buffers) -> None:
        """Return `buffers` (from take) whose memory nothing else uses; the others stay lent until a
        later call (e.g. once the output that aliases them is written). Calls may repeat."""
        with self._lock:
            for b in buffers:
                if id(b) not in self._lent or not _unshared(b):
                    continue
                del self._lent[id(b)]
                self._lent_bytes -= b.numel()
                if self._idle_bytes() + self._lent_bytes + b.numel() <= self._limit(0):
                    self._idle.append(b)

    def forget(self, buffers) -> None:
        """Stop tracking `buffers` still lent (their users free them); after the last give_back."""
        with self._lock:
            for b in buffers:
                if self._lent.pop(id(b), None) is not None:
                    self._lent_bytes -= b.numel()

    def held_bytes(self) -> int:
        """Bytes of the buffers handed out and idle."""
        with self._lock:
            return self._lent_bytes + self._idle_bytes()

    def _limit(self, extra: int) -> int:
        """Bytes the pool may hold once `extra` more are handed out."""
        return min(self.keep_bytes, max(self._peak_lent, self._lent_bytes + extra))

    def _idle_bytes(self) -> int:
        return sum(b.numel() for b in self._idle)
