"""What a model-parallel layout plans, run on the output engine: one file per rank, all in one pass.

A sharding plan is a list of engine Jobs in source order, each made by `shard_job` from the source
tensors it reads together (e.g. a GPTQ qweight/qzeros/scales triple, or q, k and v to fuse) and its
SliceOuts, each an output tensor of one rank's file with the function that makes it. Every output's
name, dtype and shape is known before any byte is written, so all rank files are streamed at once:
memory holds one job's tensors, never a whole rank's state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import SourceCheckpoint
from ..engine import Job, RunStats, run_jobs
from ..st_io import OutEntry


@dataclass
class SliceOut:
    """One output tensor: where it goes and how it is made from the job's source tensors {name: tensor}."""
    file: str
    entry: OutEntry
    make: Callable[[dict[str, torch.Tensor]], torch.Tensor]


def shard_job(sources, outputs: list[SliceOut]) -> Job:
    sources = tuple(sources)

    def compute(xs: list[torch.Tensor], which: list[int]) -> list[torch.Tensor]:
        srcs = dict(zip(sources, xs))
        return [outputs[i].make(srcs).contiguous() for i in which]
    return Job(sources, [(o.file, o.entry) for o in outputs], compute)


def write_rank_files(ckpt: SourceCheckpoint, jobs: list[Job], dst: Path, *, fingerprint: str,
                     texts: dict[str, str], overwrite: bool = False, copy_files: tuple[str | Path, ...] = (),
                     progress: bool | None = None, resume: bool = False) -> RunStats:
    """Run `jobs` on the output engine (fp8norm.engine), writing every rank file of `dst` in one
    streaming pass; then the `copy_files` that exist in the source and the `texts` {name: text} (the
    layout description, ...). Under torchrun the rank files are shared out between the processes."""
    copies = tuple(Path(rel) for rel in copy_files if (ckpt.root / rel).is_file() and str(rel) not in texts)
    biggest = max([sum(ckpt.tensors[n].nbytes for n in j.sources) for j in jobs]
                  + [sum(e.nbytes for _, e in j.outputs) for j in jobs] + [1])
    return run_jobs(ckpt, jobs, Path(dst), fingerprint=fingerprint, resume=resume, overwrite=overwrite,
                    progress=progress, buffer_bytes=biggest, texts=texts, copies=copies, desc="fp8norm shard")
