"""Streaming writer for model-parallel layouts: one output file per rank, all written in one pass.

A sharding plan is a list of ShardJobs in source order. Each job names the source tensors it reads
together (e.g. a GPTQ qweight/qzeros/scales triple, or q, k and v to fuse) and the outputs it makes
from them, each going to one rank's file. Every output's name, dtype and shape is known before any
byte is written, so each rank file's header is laid out up front and all rank files are streamed at
once: memory holds one job's tensors, never a whole rank's state. Files appear under their final
names only when complete (temporary name, fsync, rename); a layout JSON is written last.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .checkpoint import SourceCheckpoint
from .pipeline import ManifestRecord, OutputError, _on_rank0, drop_rank_manifests, prepare_dst, write_manifest
from .st_io import DTYPE_NAMES, OutEntry, ShardWriter, atomic_write_text, read_tensor


@dataclass
class SliceOut:
    """One output tensor: where it goes and how it is made from the job's source tensors."""
    file: str
    entry: OutEntry
    make: Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class ShardJob:
    sources: tuple[str, ...]
    outputs: list[SliceOut] = field(default_factory=list)


@dataclass
class ShardSummary:
    files: int
    tensors_in: int
    tensors_out: int
    bytes_in: int
    bytes_out: int
    wall_s: float

    def format(self) -> str:
        return (f"tensors   {self.tensors_in} read -> {self.tensors_out} written in {self.files} rank file(s)\n"
                f"bytes     {self.bytes_in / 1e9:.3f} GB in -> {self.bytes_out / 1e9:.3f} GB out\n"
                f"time      {self.wall_s:.2f} s")


def write_rank_files(ckpt: SourceCheckpoint, jobs: list[ShardJob], dst: Path, *, layout: dict,
                     layout_name: str, fingerprint: str, overwrite: bool = False,
                     copy_files: tuple[str, ...] = (), progress: bool | None = None,
                     resume: bool = False) -> ShardSummary:
    """Execute `jobs`, writing every rank file of `dst` in one streaming pass.

    Under torchrun the rank files are shared out between the processes (byte-balanced, as in
    fp8norm.distributed); each reads the sources of its own files only, and rank 0 writes the
    copied files and the layout JSON once all files are complete. Finished files are recorded in
    the manifest as they are committed, so `resume` writes only the missing ones.
    """
    t0 = time.perf_counter()
    dst = Path(dst)
    ctx = distributed.context()

    def prepare() -> set[str]:
        found = prepare_dst(ckpt.root, dst, fingerprint, resume=resume, overwrite=overwrite)
        write_manifest(dst, fingerprint, found, complete=False)
        return found

    done = _on_rank0(ctx, prepare)
    files: dict[str, list[OutEntry]] = {}
    for job in jobs:
        for out in job.outputs:
            files.setdefault(out.file, []).append(out.entry)
    mine = set(files) - done
    if ctx is not None:
        sizes = {f: sum(e.nbytes for e in entries) for f, entries in files.items() if f not in done}
        mine = set(distributed.assign_shards(sizes, ctx.world)[ctx.rank])
    error = None
    counts = (0, 0, 0)
    try:
        counts = _stream_rank_files(ckpt, jobs, dst, {f: e for f, e in files.items() if f in mine}, ctx,
                                    fingerprint, progress)
    except BaseException as e:  # noqa: BLE001 - decided below, once every rank knows
        if ctx is None:
            raise
        error = e
        if not isinstance(e, distributed.RankAborted):
            distributed.record_failure(dst, ctx.rank, str(e))
    bytes_in, bytes_out, n_out = counts
    if ctx is not None:
        stats = ctx.gather(counts)
        bytes_in, bytes_out, n_out = (sum(x) for x in zip(*stats))
        failed = distributed.failure(dst)
        if failed is not None:
            if ctx.rank == 0:
                raise OutputError(f"rank {failed['rank']} of {ctx.world} failed: {failed['error']}")
            raise distributed.RankAborted(failed["error"]) from error
    if ctx is None or ctx.rank == 0:
        for rel in copy_files:
            if (ckpt.root / rel).is_file():
                out = dst / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(f".{out.name}.partial")
                shutil.copyfile(ckpt.root / rel, tmp)
                os.replace(tmp, out)
        atomic_write_text(dst / layout_name, json.dumps(layout, indent=2) + "\n")
        drop_rank_manifests(dst)
        write_manifest(dst, fingerprint, files, complete=True)
    return ShardSummary(len(files), sum(len(j.sources) for j in jobs), n_out, bytes_in, bytes_out,
                        time.perf_counter() - t0)


def _stream_rank_files(ckpt, jobs, dst, files: dict[str, list[OutEntry]], ctx, fingerprint,
                       progress) -> tuple[int, int, int]:
    """Write `files` (all of them, or this rank's share): returns (bytes read, bytes written, tensors written)."""
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
    record = ManifestRecord(dst, fingerprint, ctx)
    my_jobs = [j for j in jobs if any(o.file in files for o in j.outputs)]
    writers = {f: ShardWriter(dst / f, entries) for f, entries in files.items()}
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=sum(ckpt.tensors[n].nbytes for j in my_jobs for n in j.sources), unit="B", unit_scale=True,
               desc="fp8norm shard" if ctx is None else f"fp8norm shard rank {ctx.rank}", disable=not show)
    bytes_in = bytes_out = n_out = 0
    handles = {}
    try:
        for job in my_jobs:
            if ctx is not None and distributed.failure(dst) is not None:
                raise distributed.RankAborted("another rank failed")
            srcs = {}
            for n in job.sources:
                info = ckpt.tensors[n]
                f = handles.get(info.file) or handles.setdefault(info.file, open(info.file, "rb"))
                srcs[n] = read_tensor(info, f)
                bytes_in += info.nbytes
            for out in job.outputs:
                if out.file not in writers:
                    continue
                t = out.make(srcs)
                if DTYPE_NAMES.get(t.dtype) != out.entry.dtype or tuple(t.shape) != out.entry.shape:
                    raise RuntimeError(f"{out.file}: {out.entry.name}: made {DTYPE_NAMES.get(t.dtype)} "
                                       f"{list(t.shape)}, planned {out.entry.dtype} {list(out.entry.shape)}")
                bytes_out += writers[out.file].write(out.entry.name, t.contiguous())
                n_out += 1
            bar.update(sum(ckpt.tensors[n].nbytes for n in job.sources))
        for f, w in writers.items():
            w.commit()
            record.finished(f)
    except BaseException:
        for w in writers.values():
            if w.tmp_path.exists():
                w.abort()
        raise
    finally:
        for f in handles.values():
            f.close()
        bar.close()
    return bytes_in, bytes_out, n_out
