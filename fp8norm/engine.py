"""One executor for every writing command: jobs (source tensors -> output tensors) into output files.

quantize, convert and repack (one job per planned tensor, files written one after another) and shard /
unshard (one job per module, every rank file open at once) all run here. Three stages overlap: a reader
thread reads each job's source tensors into a bounded queue, compute workers (the calling thread and,
by default, one more: fp8norm.threads) make the outputs, a writer thread streams them into their
files in job order. Each queue holds at most QUEUE_BYTES (or `buffer_bytes` where smaller), so
resident memory stays within a few buffers whatever the model size.

The reader reads each tensor into a reused buffer (fp8norm.buffers) and hashes it (fp8norm.digest, in
its thread, no extra read); the writer folds those digests per output file and source file and hashes
each file it writes. Both go into the manifest as each file is committed, so `--resume` can tell a
changed source and a damaged output file apart (see fp8norm.output). Under torchrun the files are
shared out between the ranks (byte-balanced, see fp8norm.distributed); rank 0 prepares DST, and once
every file is on disk writes the copied files, the text files (index, config, ...) and the final
manifest.
"""

from __future__ import annotations

import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from . import _faults, digest, distributed, timing
from ._memory import pin_mmap_threshold
from .buffers import BufferPool
from .checkpoint import SourceCheckpoint
from .output import (MANIFEST_NAME, PARTIAL_GLOB, ManifestRecord, OutputDir, OutputError, atomic_write_text,
                     copy_file, io_error, read_manifests, save_folded_manifest, source_identity, with_file)
from .st_io import MappedTensor, OutEntry, ShardWriter, build_header, read_tensor, tensor_bytes
from .threads import compute_workers

if TYPE_CHECKING:
    import torch


@dataclass
class Job:
    """Source tensors read together, and the output tensors made from them.

    `compute(xs, which)` returns the outputs at indices `which` of `outputs` (a process under torchrun
    makes only those of its own files), on the CPU, as `outputs` describes them. `compute` None: output
    i is source i as it is, its bytes copied from the source file by the kernel (never read into
    buffers: the digests read them through a mapping of the page cache)."""
    sources: tuple[str, ...]
    outputs: list[tuple[str, OutEntry]]  # (output file, entry)
    compute: Callable[[list[torch.Tensor], list[int]], list[torch.Tensor]] | None


@dataclass
class RunStats:
    """A run's figures (rank 0's count the whole torchrun job); `format` is the shard commands' summary."""
    tensors_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    tensors_out: int = 0
    files_written: int = 0
    files_skipped: int = 0
    files: int = 0
    wall_s: float = 0.0
    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    # parts of the above (hash: reader + writer, fsync: writer) and the stages around them
    hash_s: float = 0.0
    fsync_s: float = 0.0
    verify_s: float = 0.0
    first_read_s: float | None = None  # from fp8norm's start (fp8norm.timing) to its first tensor read
    notes: list[str] = field(default_factory=list)
    SUMMED_OVER_RANKS: ClassVar = ("bytes_in", "bytes_out", "files_written", "tensors_out", "tensors_in")

    def format(self) -> str:
        resumed = f"; {self.files_skipped} already done, kept" if self.files_skipped else ""
        return "\n".join([
            f"tensors   {self.tensors_in} read -> {self.tensors_out} written in {self.files} rank file(s){resumed}",
            f"bytes     {self.bytes_in / 1e9:.3f} GB in -> {self.bytes_out / 1e9:.3f} GB out",
            f"time      {self.wall_s:.2f} s", *self.notes])


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a single-process run once DST was touched, raised after the reader and writer
    threads have stopped and every partly written file is gone. `holds`: what DST holds now, a clause;
    `next_step`: "resume" (the same command with --resume goes on), "again" (the same command as
    given: --overwrite was preparing DST) or None (the output is complete). `work`: the folder the new
    output is written to (DST, or the staging folder of an --overwrite)."""
    PREPARING, WRITING, COMPLETE = "preparing", "writing", "complete"

    def __init__(self, dst: Path, stage: str, *, finished: int, files: int, overwrite: bool, work: Path):
        self.dst, self.stage, self.finished, self.files = dst, stage, finished, files
        manifest = f"listed in {MANIFEST_NAME}"
        if stage == self.PREPARING:
            self.holds = (f"{dst} was being prepared for --overwrite; what it held is untouched" if overwrite else
                          f"{dst} was being prepared; this run wrote nothing yet")
            self.next_step = "again" if overwrite else "resume"
        elif stage == self.COMPLETE:
            self.holds, self.next_step = f"the output in {dst} is complete", None
        elif work != dst:
            self.holds = (f"the previous output in {dst} is untouched; {finished} of {files} output file(s) of "
                          f"the new one are finished and kept in {work} ({manifest})")
            self.next_step = "resume"
        elif finished == files:
            self.holds = (f"all {files} output file(s) are finished and kept in {dst} ({manifest}); the index "
                          "and the other closing files are not written yet")
            self.next_step = "resume"
        else:
            self.holds = (f"{finished} of {files} output file(s) are finished and kept in {dst} ({manifest}); "
                          "no partly written file is left")
            self.next_step = "resume"
        super().__init__(self.holds)


class InputDigests:
    """Per output file and source file: a digest over the digests of the source tensors read for it."""

    def __init__(self, ckpt: SourceCheckpoint):
        self.ckpt, self.h = ckpt, {}

    def add(self, job: Job, files, digests: list[bytes]) -> None:
        for f in files:
            for name, d in zip(job.sources, digests):
                rel = str(self.ckpt.tensors[name].file.relative_to(self.ckpt.root))
                self.h.setdefault(f, {}).setdefault(rel, digest.new()).update(d)

    def of(self, f: str) -> dict[str, str]:
        return {rel: h.hexdigest() for rel, h in sorted(self.h.get(f, {}).items())}


def _digest(t: torch.Tensor) -> bytes:
    return digest.of_bytes(tensor_bytes(t))


def _source_digest(info, f) -> bytes:
    """A source tensor's digest, read through a mapping of its file (the same bytes read_tensor reads)."""
    m = MappedTensor(info, f)
    try:
        return m.digest()
    finally:
        m.close()


def _check_unchanged_sources(ckpt: SourceCheckpoint, jobs: list[Job], done: dict[str, dict], changed: set[str]):
    """Sources whose mtime changed: re-read what the finished files were made from and compare digests."""
    digests = InputDigests(ckpt)
    handles = {}
    try:
        for job in jobs:
            files = {f for f, _ in job.outputs if f in done}
            rels = {str(ckpt.tensors[n].file.relative_to(ckpt.root)) for n in job.sources}
            if files and rels & changed:
                infos = [ckpt.tensors[n] for n in job.sources]
                digests.add(job, files, [_source_digest(i, _opened(handles, i.file)) for i in infos])
    finally:
        for f in handles.values():
            f.close()
    for f in done:
        for rel, hexd in digests.of(f).items():
            if rel in changed and done[f].get("inputs", {}).get(rel) != hexd:
                raise OutputError(f"{ckpt.root / rel}: the source changed since the interrupted run (other bytes "
                                  f"than those {f} was made from); use --overwrite to start again")


def _opened(handles: dict, path: Path):
    """`path` open for reading, once: kept in `handles` {path: file} (the caller closes them)."""
    f = handles.get(path)
    if f is None:
        try:
            f = handles[path] = open(path, "rb")
        except OSError as e:
            raise with_file(e, path) from None
    return f


def run_jobs(ckpt: SourceCheckpoint, jobs: list[Job], dst: str | Path, *, fingerprint: str, resume: bool = False,
             overwrite: bool = False, progress: bool | None = None, buffer_bytes: int,
             texts: dict[str, str] | None = None, copies: tuple[Path, ...] = (),
             before_finish: Callable[[list[str], Path], dict[str, str]] | None = None, desc: str = "fp8norm",
             notes: list[str] | None = None, stats: RunStats | None = None, workers: int | None = None) -> RunStats:
    """Write every output file of `jobs` into `dst`, then the `copies` (paths relative to SRC) and the
    `texts` {name: text} in order, then the final manifest. `before_finish(files written, folder)` runs
    on rank 0 once every file is on disk in `folder` (e.g. to re-read samples); the texts it returns
    replace those of `texts` (e.g. fp8norm.json marked as failed). `notes`: a list the jobs'
    computations append to; under torchrun rank 0's list ends up holding every rank's notes. `workers`:
    compute workers (default: fp8norm.threads' choice). Returns the run's statistics (in `stats` when
    given)."""
    pin_mmap_threshold()
    dst = Path(dst)
    ctx = distributed.context()
    rank0 = ctx is None or ctx.rank == 0
    out = OutputDir(ckpt.root, dst, fingerprint, resume=resume, overwrite=overwrite)
    files: dict[str, list[OutEntry]] = {}  # every output file's tensors, in the order they are written
    for job in jobs:
        for f, e in job.outputs:
            files.setdefault(f, []).append(e)
    sizes = {f: len(build_header(entries)) + sum(e.nbytes for e in entries) for f, entries in files.items()}
    total = sum(sizes.values())
    sources = source_identity(ckpt.root, ckpt.files)
    stats = stats or RunStats()
    stats.files = len(files)
    finished: dict[str, dict] = {}
    t_start = time.perf_counter()

    def prepare() -> tuple[dict[str, dict], str]:
        closing = _closing_bytes(ckpt, copies, texts)
        done = out.open(lambda kept: sum(s for f, s in sizes.items() if f not in kept) + closing, sources)
        if done and out.changed_mtime:
            _check_unchanged_sources(ckpt, jobs, done, out.changed_mtime)
        save_folded_manifest(out.work, fingerprint, sources, done)
        return done, str(out.work)

    def still_needed() -> int:
        """Bytes of the output files not yet under their final names (the closing files counted), and
        the manifest's (rewritten, atomically, at the end)."""
        manifest = work / MANIFEST_NAME
        return (total - sum(sizes.get(f, 0) for f in finished) + _closing_bytes(ckpt, copies, texts, work)
                + (manifest.stat().st_size if manifest.is_file() else 0))

    stage = Interrupted.PREPARING
    work = dst  # where the files are written: DST, or the staging folder of an --overwrite (see OutputDir)
    try:
        try:
            done, work = distributed.on_rank0(ctx, prepare)  # its errors (DST locked, ...) must not be recorded in DST
        except OSError as e:
            raise io_error(e, dst, still_needed(), 0) from None
        work = Path(work)
        finished.update(done)
        stage = Interrupted.WRITING
        stats.files_skipped = len(done)
        pending = [f for f in files if f not in done]
        mine = set(pending)
        if ctx is not None:
            mine = set(distributed.assign_shards({f: sizes[f] for f in pending}, ctx.world)[ctx.rank])
        try:
            try:
                record = ManifestRecord(work, fingerprint, sources, ctx, done if rank0 else None)
                _stream(ckpt, jobs, work, files, mine, pending, record, finished, ctx, progress, buffer_bytes,
                        stats, desc, workers or compute_workers())
            except OSError as e:
                raise io_error(e, dst, still_needed(), sum(sizes.get(f, 0) for f in finished)) from None
        except BaseException as e:  # noqa: BLE001 - decided below, after the other ranks are told
            if ctx is None:
                raise
            if not isinstance(e, distributed.RankAborted):
                distributed.record_failure(work, ctx.rank, str(e) or type(e).__name__)
        if ctx is not None:
            # every rank has stopped streaming; rank 0's statistics count the whole job
            per_rank = distributed.sum_over_ranks(ctx, stats, RunStats.SUMMED_OVER_RANKS, notes)
            if rank0:
                stats.notes.append(f"ranks     {ctx.world} (torchrun), files written per rank: "
                                   f"{', '.join(str(r['files_written']) for r in per_rank)}")
            failed = distributed.failure(work)
            if failed is not None:
                if rank0:
                    raise OutputError(f"rank {failed['rank']} of {ctx.world} failed: {failed['error']}")
                raise distributed.RankAborted(failed["error"])
        if rank0:
            try:
                if before_finish is not None:
                    t0 = time.perf_counter()
                    texts = {**(texts or {}), **before_finish(pending, work)}
                    stats.verify_s += time.perf_counter() - t0
                _finish(ckpt, work, copies, texts, fingerprint, sources)
                if work != dst:
                    out.swap_in()
                stage = Interrupted.COMPLETE
            except OSError as e:
                raise io_error(e, dst, still_needed(), total) from None
        if ctx is not None:
            ctx.gather(True)  # nobody leaves before rank 0 has written the index and config
    except KeyboardInterrupt:
        if ctx is not None:
            raise
        if stage != Interrupted.PREPARING:
            # the lock is still held, so every partial file is this run's (the writer drops its own,
            # a text file cut short in _finish is dropped here)
            for p in work.rglob(PARTIAL_GLOB):
                p.unlink(missing_ok=True)
        raise Interrupted(dst, stage, finished=len(finished), files=len(files), overwrite=overwrite,
                          work=work) from None
    finally:
        out.close()
    stats.wall_s = time.perf_counter() - t_start
    return stats


def _closing_bytes(ckpt, copies, texts, written_in: Path | None = None) -> int:
    """Bytes of the copied and text files (those not yet in `written_in`, when given)."""
    todo = {rel: (ckpt.root / rel).stat().st_size for rel in copies}
    todo.update({name: len(t.encode()) for name, t in (texts or {}).items()})
    return sum(n for rel, n in todo.items() if written_in is None or not (written_in / rel).is_file())


def _finish(ckpt, dst: Path, copies, texts, fingerprint: str, sources: dict) -> None:
    """Rank 0, once every file is on disk: copied files, text files, then the final manifest."""
    for rel in copies:
        copy_file(ckpt.root / rel, dst / rel)
    for name, text in (texts or {}).items():
        atomic_write_text(dst / name, text)
    save_folded_manifest(dst, fingerprint, sources, read_manifests(dst, fingerprint)[1], complete=True)
    shutil.rmtree(dst / distributed.PROGRESS_DIR, ignore_errors=True)  # also one left by a killed torchrun job


class _ByteBudget:
    """Blocks producers while more than `limit` bytes are queued (one oversized item may pass alone)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> None:
        with self.cond:
            while self.used and self.used + n > self.limit and not stop.is_set():
                self.cond.wait(0.1)
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


_DONE = object()
# The most either queue holds (where half a shard is more). 128 MiB is 20 ms of NVMe at 7 GB/s: enough
# to ride out jitter; deeper queues only hold memory once reading got fast (with half a 4 GB shard, a
# 1.5 GB quantize read the whole model ahead: peak RSS 1.3 GB against 0.75 GB before; with 256 MiB,
# repack peaked 80 MB above the code before reused buffers).
QUEUE_BYTES = 128 << 20


class _InOrder:
    """Turns by sequence number: the compute workers hand their outputs to the writer in job order."""

    def __init__(self):
        self.next = 0
        self.cond = threading.Condition()

    def wait(self, seq: int, stop: threading.Event) -> bool:
        """Until it is `seq`'s turn (True) or the run stops (False)."""
        with self.cond:
            while self.next != seq and not stop.is_set():
                self.cond.wait(0.1)
            return self.next == seq

    def done(self, seq: int) -> None:
        with self.cond:
            if self.next == seq:
                self.next += 1
            self.cond.notify_all()


class _Worker:
    """A daemon thread running `target`, and `wait()` for its end. Not Thread.join: on CPython 3.11 a
    Ctrl-C landing in join marks a thread that is still running as stopped (bpo-45274's handler
    releases the thread's own state lock), so the caller would go on while the writer still writes."""

    def __init__(self, target: Callable[[], None]):
        self.ended = threading.Event()

        def run():
            try:
                target()
            finally:
                self.ended.set()

        threading.Thread(target=run, daemon=True).start()

    def wait(self) -> None:
        self.ended.wait()


class _NoBar:
    """A progress bar that is not shown, as tqdm's disabled one behaves, without importing tqdm (30 ms
    of the start of a run)."""
    disable, n = True, 0

    def update(self, n: int = 1) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def _stream(ckpt, jobs, dst, files, mine, pending, record, finished, ctx, progress, buffer_bytes, stats, desc,
            workers: int) -> None:
    """Read, compute and write the files in `mine` with overlapping reader / compute / writer stages."""
    work = []
    for job in jobs:
        which = [i for i, (f, _) in enumerate(job.outputs) if f in mine]
        if which:
            work.append((job, which))
    nbytes_in = {id(job): sum(ckpt.tensors[n].nbytes for n in job.sources) for job, _ in work}
    for f in mine:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = _NoBar()
    if progress and (ctx is None or ctx.rank == 0):
        from tqdm import tqdm

        # rank 0's bar counts the whole job (every rank's bytes)
        all_in = sum(sum(ckpt.tensors[n].nbytes for n in job.sources) for job in jobs
                     if any(f in pending for f, _ in job.outputs))
        bar = tqdm(total=all_in, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True)
    share = distributed.ProgressShare(dst, ctx, bar) if ctx is not None else None
    log_lines = ctx is not None and not sys.stderr.isatty()
    stop = threading.Event()
    errors: list[BaseException] = []
    in_budget, out_budget = (_ByteBudget(min(buffer_bytes, QUEUE_BYTES)) for _ in range(2))
    q_in: queue.Queue = queue.Queue()
    q_out: queue.Queue = queue.Queue()
    digests = InputDigests(ckpt)
    pool = BufferPool(buffer_bytes)

    def fail(e: BaseException) -> None:
        errors.append(e)
        stop.set()

    def reader():
        handles = {}
        try:
            for job, which in work:
                if stop.is_set():
                    return
                in_budget.acquire(nbytes_in[id(job)], stop)
                if stop.is_set():  # woken by a stop: read nothing more
                    return
                t0 = time.perf_counter()
                if stats.first_read_s is None:
                    stats.first_read_s = timing.since_start()
                xs, ds, bufs = [], [], []
                for name in job.sources:
                    info = ckpt.tensors[name]
                    try:
                        f = _opened(handles, info.file)
                        if job.compute is None:
                            xs.append(MappedTensor(info, f))  # copied by the writer, read by nobody
                        else:
                            bufs.append(pool.take(info.nbytes))
                            xs.append(read_tensor(info, f, bufs[-1]))
                    except OSError as e:
                        raise with_file(e, info.file) from None
                    t_hash = time.perf_counter()
                    ds.append(xs[-1].digest() if job.compute is None else _digest(xs[-1]))
                    stats.hash_s += time.perf_counter() - t_hash
                stats.read_s += time.perf_counter() - t0
                stats.tensors_in += len(xs)
                q_in.put((job, which, xs, ds, bufs))
                del xs
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            fail(e)
        finally:
            for f in handles.values():
                f.close()
            q_in.put(_DONE)

    def writer():
        remaining = {f: len(files[f]) for f in mine}
        open_files: dict[str, ShardWriter] = {}
        sources = {}  # source files open for copy jobs
        try:
            while True:
                item = q_out.get()
                if item is _DONE or stop.is_set():
                    return
                job, which, outs, ds, nbytes, bufs = item
                t0 = time.perf_counter()
                digests.add(job, {job.outputs[i][0] for i in which}, ds)
                for i, tensor in zip(which, outs):
                    f, entry = job.outputs[i]
                    try:
                        w = open_files.get(f)
                        if w is None:
                            w = open_files[f] = ShardWriter(dst / f, files[f])
                        if job.compute is None:
                            stats.bytes_out += w.copy(entry.name, tensor, _opened(sources, tensor.info.file).fileno())
                        else:
                            stats.bytes_out += w.write(entry.name, tensor)
                        stats.tensors_out += 1
                        remaining[f] -= 1
                        if remaining[f] == 0:
                            w.commit()
                            del open_files[f]
                            stats.hash_s += w.hash_s
                            stats.fsync_s += w.fsync_s
                    except OSError as e:
                        raise with_file(e, dst / f) from None
                    if remaining[f] == 0:
                        rec = {"size": (dst / f).stat().st_size, "digest": w.digest, "inputs": digests.of(f)}
                        finished[f] = rec
                        record.finished(f, rec)
                        stats.files_written += 1
                        if log_lines:
                            print(f"fp8norm rank {ctx.rank}/{ctx.world}: wrote {f} "
                                  f"({stats.files_written}/{len(mine)})", file=sys.stderr, flush=True)
                stats.write_s += time.perf_counter() - t0
                if job.compute is None:
                    for m in outs:
                        m.close()
                item = outs = tensor = None  # written: drop the references before the buffers go back
                pool.give_back(bufs)  # the inputs the outputs were (repack) or were views of
                pool.forget(bufs)
                out_budget.release(nbytes)
        except BaseException as e:  # noqa: BLE001
            fail(e)
        finally:
            for w in open_files.values():
                w.abort()
            for f in sources.values():
                f.close()

    taking = threading.Lock()  # a job and its place in the order are taken together
    order = _InOrder()
    seqs = iter(range(len(work)))

    def compute() -> None:
        """One compute worker: jobs from the reader, outputs to the writer in job order."""
        while True:
            with taking:
                item = q_in.get()
                if item is _DONE or stop.is_set():
                    q_in.put(_DONE)  # for the other workers
                    return
                seq = next(seqs)
            try:
                if ctx is not None and distributed.failure(dst) is not None:
                    raise distributed.RankAborted("another rank failed")
                _faults.maybe_fail_rank(ctx)
                job, which, xs, ds, bufs = item
                t0 = time.perf_counter()
                outs = [xs[i] for i in which] if job.compute is None else job.compute(xs, which)
                compute_s = time.perf_counter() - t0
                n_in = nbytes_in[id(job)]
                del xs, item
                pool.give_back(bufs)  # those no output refers to: reused by the next reads
                in_budget.release(n_in)
                nbytes = sum(job.outputs[i][1].nbytes for i in which)
                if not order.wait(seq, stop):
                    return
                stats.compute_s += compute_s  # (summed over the workers)
                out_budget.acquire(nbytes, stop)
                q_out.put((job, which, outs, ds, nbytes, bufs))
                del outs
                stats.bytes_in += n_in
                if share is not None:
                    share.update(n_in)
                else:
                    bar.update(n_in)
            finally:
                order.done(seq)

    def helper() -> None:
        try:
            compute()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            fail(e)

    threads = [_Worker(reader), _Worker(writer)]
    helpers = [_Worker(helper) for _ in range(workers - 1)]
    try:
        compute()  # the calling thread is a worker too: a Ctrl-C lands in it
    except BaseException as e:  # noqa: BLE001
        fail(e)
    finally:
        # every worker has queued its last outputs before the writer is told to end
        for th in [*helpers, None, *threads]:
            if th is None:
                q_out.put(_DONE)
                continue
            while True:
                try:
                    th.wait()
                    break
                except KeyboardInterrupt as e:  # a Ctrl-C while stopping: wait all the same (one tensor at most)
                    fail(e)
        if share is not None:
            share.close()
        bar.close()
    if errors:
        raise errors[0]
