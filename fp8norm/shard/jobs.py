"""Streaming writer for model-parallel layouts: one output file per rank, all written in one pass.

A sharding plan is a list of ShardJobs in source order. Each job names the source tensors it reads
together (e.g. a GPTQ qweight/qzeros/scales triple, or q, k and v to fuse) and the outputs it makes
from them, each going to one rank's file. Every output's name, dtype and shape is known before any
byte is written, so each rank file's header is laid out up front and all rank files are streamed at
once: memory holds one job's tensors, never a whole rank's state. Files appear under their final
names only when complete (temporary name, fsync, rename); a layout JSON is written last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import SourceCheckpoint
from ..engine import Job, run_jobs
from ..st_io import OutEntry


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


def write_rank_files(ckpt: SourceCheckpoint, jobs: list[ShardJob], dst: Path, *, fingerprint: str,
                     texts: dict[str, str], overwrite: bool = False, copy_files: tuple[str | Path, ...] = (),
                     progress: bool | None = None, resume: bool = False) -> ShardSummary:
    """Execute `jobs` on the output engine (fp8norm.engine), writing every rank file of `dst` in one
    streaming pass; then the `copy_files` that exist in the source and the `texts` {name: text} (the
    layout description, ...). Under torchrun the rank files are shared out between the processes."""
    copies = tuple(Path(rel) for rel in copy_files if (ckpt.root / rel).is_file() and str(rel) not in texts)
    engine_jobs = [Job(j.sources, [(o.file, o.entry) for o in j.outputs], _maker(j)) for j in jobs]
    biggest = max([sum(ckpt.tensors[n].nbytes for n in j.sources) for j in jobs]
                  + [sum(o.entry.nbytes for o in j.outputs) for j in jobs] + [1])
    stats = run_jobs(ckpt, engine_jobs, Path(dst), fingerprint=fingerprint, resume=resume, overwrite=overwrite,
                     progress=progress, buffer_bytes=biggest, texts=texts, copies=copies, desc="fp8norm shard")
    return ShardSummary(stats.files, sum(len(j.sources) for j in jobs), stats.tensors_out, stats.bytes_in,
                        stats.bytes_out, stats.wall_s)


def _maker(job: ShardJob):
    def compute(xs: list[torch.Tensor], which: list[int]) -> list[torch.Tensor]:
        srcs = dict(zip(job.sources, xs))
        return [job.outputs[i].make(srcs).contiguous() for i in which]
    return compute
