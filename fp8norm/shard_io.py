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

from .checkpoint import SourceCheckpoint
from .pipeline import prepare_dst
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
                     copy_files: tuple[str, ...] = (), progress: bool | None = None) -> ShardSummary:
    """Execute `jobs`, writing every rank file of `dst` in one streaming pass."""
    t0 = time.perf_counter()
    dst = Path(dst)
    prepare_dst(ckpt.root, dst, fingerprint, resume=False, overwrite=overwrite)
    files: dict[str, list[OutEntry]] = {}
    for job in jobs:
        for out in job.outputs:
            files.setdefault(out.file, []).append(out.entry)
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
    writers = {f: ShardWriter(dst / f, entries) for f, entries in files.items()}
    from tqdm import tqdm

    bar = tqdm(total=sum(ckpt.tensors[n].nbytes for j in jobs for n in j.sources), unit="B", unit_scale=True,
               desc="fp8norm shard", disable=not (sys.stderr.isatty() if progress is None else progress))
    bytes_in = bytes_out = n_out = 0
    handles = {}
    try:
        for job in jobs:
            srcs = {}
            for n in job.sources:
                info = ckpt.tensors[n]
                f = handles.get(info.file) or handles.setdefault(info.file, open(info.file, "rb"))
                srcs[n] = read_tensor(info, f)
                bytes_in += info.nbytes
            for out in job.outputs:
                t = out.make(srcs)
                if DTYPE_NAMES.get(t.dtype) != out.entry.dtype or tuple(t.shape) != out.entry.shape:
                    raise RuntimeError(f"{out.file}: {out.entry.name}: made {DTYPE_NAMES.get(t.dtype)} "
                                       f"{list(t.shape)}, planned {out.entry.dtype} {list(out.entry.shape)}")
                bytes_out += writers[out.file].write(out.entry.name, t.contiguous())
                n_out += 1
            bar.update(sum(ckpt.tensors[n].nbytes for n in job.sources))
        for w in writers.values():
            w.commit()
    except BaseException:
        for w in writers.values():
            if w.tmp_path.exists():
                w.abort()
        raise
    finally:
        for f in handles.values():
            f.close()
        bar.close()
    for rel in copy_files:
        if (ckpt.root / rel).is_file():
            out = dst / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.partial")
            shutil.copyfile(ckpt.root / rel, tmp)
            os.replace(tmp, out)
    atomic_write_text(dst / layout_name, json.dumps(layout, indent=2) + "\n")
    return ShardSummary(len(files), sum(len(j.sources) for j in jobs), n_out, bytes_in, bytes_out,
                        time.perf_counter() - t0)
