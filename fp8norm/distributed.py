"""Running one fp8norm job across torchrun ranks (one node or several, with a shared DST).

    torchrun --nproc-per-node 8 -m fp8norm quantize SRC DST
    torchrun --nnodes 4 --node-rank $R --rdzv-backend c10d --rdzv-endpoint host:29500 \\
             --nproc-per-node 8 -m fp8norm quantize SRC DST          # DST on a shared file system

Every rank builds the same plan and the same byte-balanced assignment of output shards to ranks
(`assign_shards`), reads only the source tensors of its own shards, computes on its local GPU
(LOCAL_RANK) and writes its shards. Rank 0 prepares DST first and, after a barrier at the end,
writes the index, config and manifest. torch.distributed (gloo: only small Python objects travel)
carries the barriers; a failing rank leaves its error in DST/.fp8norm-failed, which the others
notice between tensors, so the job stops everywhere and the error is shown once (by rank 0).
Finished shards are recorded per rank (.fp8norm-manifest.rankN.json, see fp8norm.output), so
`--resume` works after a partial run with the same or a different number of ranks. Without
torchrun nothing here runs.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

FAIL_FILE = ".fp8norm-failed"
PROGRESS_DIR = ".fp8norm-progress"


class RankAborted(RuntimeError):
    """This rank stopped because another one failed (that rank's error is reported by rank 0)."""


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int

    def gather(self, obj) -> list:
        """Every rank's `obj`, on every rank (also a barrier)."""
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


_ctx: DistContext | None = None


def context() -> DistContext | None:
    """The torchrun context (process group initialised once), or None for a single process."""
    global _ctx
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if _ctx is None:
        import torch.distributed as dist

        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=float(os.environ.get("FP8NORM_DIST_TIMEOUT", "1800")))
            dist.init_process_group("gloo", timeout=timeout)
        _ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return _ctx


def on_rank0(ctx: DistContext | None, fn):
    """Run `fn` on rank 0 only and share its (picklable) result, or its error, with every rank."""
    if ctx is None:
        return fn()
    result, err = None, None
    if ctx.rank == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below on rank 0, reported as abort elsewhere
            err = e
    shared, message = ctx.gather((result, None if err is None else str(err)))[0]
    if message is not None:
        if err is not None:
            raise err
        raise RankAborted(message)
    return shared


def sum_over_ranks(ctx: DistContext, stats, fields: tuple[str, ...], notes: list | None) -> list[dict]:
    """On rank 0, `stats`' int attributes `fields` become their sums over every rank and `notes` every
    rank's notes (in rank order). Returns each rank's own {field: value}. Every rank takes part (a
    barrier)."""
    gathered = ctx.gather(({f: getattr(stats, f) for f in fields}, list(notes or [])))
    if ctx.rank == 0:
        for f in fields:
            setattr(stats, f, sum(counts[f] for counts, _ in gathered))
        if notes is not None:
            notes[:] = [n for _, rank_notes in gathered for n in rank_notes]
    return [counts for counts, _ in gathered]


def assign_shards(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Byte-balanced, deterministic: largest shard first onto the least-loaded rank (lowest on ties)."""
    load = [0] * world
    out: list[list[str]] = [[] for _ in range(world)]
    for shard in sorted(sizes, key=lambda s: (-sizes[s], s)):
        r = min(range(world), key=lambda i: (load[i], i))
        out[r].append(shard)
        load[r] += sizes[shard]
    return out


def record_failure(dst: Path, rank: int, message: str) -> None:
    """Leave the first failure's message in DST for the other ranks (and rank 0's report)."""
    try:
        fd = os.open(dst / FAIL_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"rank": rank, "error": message}))


def failure(dst: Path) -> dict | None:
    p = dst / FAIL_FILE
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {"rank": -1, "error": "a rank failed"}


class ProgressShare:
    """Ranks publish their byte counts in DST/.fp8norm-progress; rank 0's bar shows the sum."""

    def __init__(self, dst: Path, ctx: DistContext, bar):
        self.dir, self.ctx, self.bar = dst / PROGRESS_DIR, ctx, bar
        self.dir.mkdir(exist_ok=True)
        self.done, self.last = 0, 0.0
        self._stop = threading.Event()
        self._thread = None
        if ctx.rank == 0 and not bar.disable:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if now - self.last > 0.5:
            self.last = now
            (self.dir / f"rank{self.ctx.rank}").write_text(str(self.done))

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            total = 0
            for p in self.dir.glob("rank*"):
                try:
                    total += int(p.read_text() or 0)
                except (OSError, ValueError):
                    pass
            self.bar.n = max(self.bar.n, total)
            self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def shutdown() -> None:
    """Tear the process group down before exit (a live gloo group aborts the interpreter at exit)."""
    global _ctx
    if _ctx is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _ctx = None
