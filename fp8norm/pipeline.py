"""Execute a plan: stream tensors from the source, transform them, write the output shards.

Three stages overlap: a reader thread reads source tensors (in plan order) into a bounded queue, the
calling thread computes (quantizes on the chosen device), and a writer thread streams results into
the current shard. Each queue holds at most half a shard of bytes, so resident memory stays within
about one to two output shards whatever the model size.

Crash safety: shards are written under a temporary name and renamed once complete and fsynced; a
manifest in DST records the plan fingerprint and the finished shards, so `resume=True` skips them
and produces byte-identical output. The index and config.json are written last.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .activation_stats import weights_for
from .calibrate import calibrated_quant
from . import _faults, distributed
from ._memory import pin_mmap_threshold
from .checkpoint import INDEX_NAME
from .classify import FP8
from .plan import Plan, TensorPlan
from .st_io import ShardWriter, atomic_write_text, read_header, read_tensor
from .verify import Bands, VerifyReport, compare

MANIFEST_NAME = "fp8norm-manifest.json"


class OutputError(ValueError):
    """DST cannot be written as asked (inside SRC, not empty, made by another plan...)."""


_VERBS = {"fp8": "quantized", "keep": "kept", "passthrough": "passed through", "dequant": "dequantized",
          "relabel": "relabelled", "ue8m0": "to ue8m0 scales", "nvfp4": "to NVFP4",
          "scheme": "quantized"}


@dataclass
class RunSummary:
    tensors: dict
    bytes_in: int = 0
    bytes_out: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    wall_s: float = 0.0
    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    verify: VerifyReport | None = None

    def format(self) -> str:
        gbps = self.bytes_in / max(self.wall_s, 1e-9) / 1e9
        counts = ", ".join(f"{n} {_VERBS.get(d, d)}" for d, n in self.tensors.items()
                           if d in _VERBS and (n or d == "keep"))
        lines = [
            f"tensors   {counts}",
            f"bytes     {self.bytes_in / 1e9:.3f} GB in -> {self.bytes_out / 1e9:.3f} GB out "
            f"({self.shards_written} shard(s) written, {self.shards_skipped} already done)",
            f"time      {self.wall_s:.2f} s wall: read {self.read_s:.2f} s, compute {self.compute_s:.2f} s "
            f"({self.device}), write {self.write_s:.2f} s; {gbps:.2f} GB/s",
        ]
        return "\n".join(lines + self.notes)


def resolve_device(device: str, ctx=None) -> torch.device:
    """auto: CUDA when present (under torchrun the rank's LOCAL_RANK GPU), else the CPU."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", ctx.local_rank % torch.cuda.device_count()) if ctx else torch.device("cuda")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OutputError(f"--device {device}: CUDA is not available on this machine")
    return dev


def quantize_tensor(t: TensorPlan, xs: list[torch.Tensor], plan: Plan, device: torch.device) -> list[torch.Tensor]:
    """The output tensors of one planned tensor (inputs `xs`), in the order of t.outputs."""
    x = xs[0]
    if t.decision != FP8:
        return [x]
    s = plan.settings
    try:
        q, scale_inv = calibrated_quant(x.to(device), s.calib, block_size=s.block_size, scale_fmt=s.scale_fmt,
                                        scale_dtype=s.torch_scale_dtype, amax_floor=s.amax_floor,
                                        act_weights=weights_for(plan.activation_stats, t.name))
    except ValueError as e:
        raise ValueError(f"{t.source_file}: tensor {t.name!r}: {e}") from None
    return [q.cpu(), scale_inv.cpu()]


def prepare_dst(src: Path, dst: Path, fingerprint: str, *, resume: bool, overwrite: bool) -> set[str]:
    """Check DST and return the shards a previous run of the same plan already finished."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents:
        raise OutputError(f"{dst}: the output may not be the source directory or inside it ({src})")
    if dst in src.parents:
        raise OutputError(f"{dst}: the output may not contain the source directory ({src})")
    manifest_path = dst / MANIFEST_NAME
    if dst.exists() and (resume or not _has_real_files(dst)):
        # leftovers of an interrupted write are never part of an output: drop them first
        for p in dst.rglob(".*.partial"):
            p.unlink()
    if dst.exists() and _has_real_files(dst):
        if overwrite:
            shutil.rmtree(dst)
        elif resume:
            if not manifest_path.exists():
                raise OutputError(f"{dst}: not empty and holds no {MANIFEST_NAME}: nothing to resume "
                                  "(use --overwrite to replace it)")
            done = {}
            # the main manifest, and those of the ranks of an interrupted torchrun job (any count)
            for path in [manifest_path, *sorted(dst.glob(distributed.RANK_MANIFEST_GLOB))]:
                manifest = json.loads(path.read_text())
                if manifest.get("fingerprint") != fingerprint:
                    raise OutputError(f"{dst}: was started with other settings or another source (plan "
                                      "fingerprints differ); use --overwrite to start again")
                done.update(manifest.get("done", {}))
            return {s for s, size in done.items() if (dst / s).is_file() and (dst / s).stat().st_size == size}
        else:
            raise OutputError(f"{dst}: exists and is not empty; pass --resume to continue an interrupted "
                              "run or --overwrite to replace it")
    dst.mkdir(parents=True, exist_ok=True)
    if not os.access(dst, os.W_OK):
        raise OutputError(f"{dst}: not writable")
    return set()


def write_manifest(dst: Path, fingerprint: str, finished, *, complete: bool, path: Path | None = None) -> None:
    """The resume record: plan fingerprint and the finished output files with their sizes."""
    manifest = {"fingerprint": fingerprint, "done": {f: (dst / f).stat().st_size for f in sorted(finished)},
                "complete": complete}
    atomic_write_text(path or dst / MANIFEST_NAME, json.dumps(manifest, indent=1))


class ManifestRecord:
    """This process's running record of finished files: the main manifest, or under torchrun its
    rank's own (picked up again by a later run with the same rank number)."""

    def __init__(self, dst: Path, fingerprint: str, ctx):
        name = MANIFEST_NAME if ctx is None else distributed.RANK_MANIFEST.format(rank=ctx.rank)
        self.dst, self.path = dst, dst / name
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {
            "fingerprint": fingerprint, "done": {}, "complete": False}

    def finished(self, name: str) -> None:
        self.data["done"][name] = (self.dst / name).stat().st_size
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


def drop_rank_manifests(dst: Path) -> None:
    """Per-rank records of a torchrun job, once folded into the main manifest."""
    for p in dst.glob(distributed.RANK_MANIFEST_GLOB):
        p.unlink()


def _needed_bytes(plan: Plan, shards) -> int:
    shards = set(shards)
    return sum(t.nbytes_out for t in plan.tensors if t.shard in shards)


def _has_real_files(dst: Path) -> bool:
    return any(not p.name.endswith(".partial") for p in dst.iterdir())


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


def execute_plan(
    plan: Plan,
    dst: str | Path,
    *,
    transform: Callable[[TensorPlan, list[torch.Tensor], Plan, torch.device], list[torch.Tensor]] | None = None,
    finalize_config: Callable[[dict, Plan], dict] | None = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    extra_files: dict[str, str] | None = None,
    verify_samples: int = 0,
    skip_files: tuple[str, ...] = (),
) -> RunSummary:
    """Write `plan`'s output into `dst`.

    `transform` maps each source tensor to its output tensors; `finalize_config` edits config.json
    (None: copy it unchanged); `extra_files` {name: text} are written beside it (`skip_files`: source
    files not to copy); `verify_samples` FP8 tensors of each shard written are re-read from disk once
    all shards are complete and compared with the source (summary.verify holds the report). Under
    torchrun the shards are shared out between the ranks (see fp8norm.distributed).
    """
    transform = transform or quantize_tensor
    pin_mmap_threshold()
    dst = Path(dst)
    ctx = distributed.context()
    rank0 = ctx is None or ctx.rank == 0
    dev = resolve_device(device, ctx)
    fingerprint = plan.fingerprint()

    def prepare() -> set[str]:
        found = prepare_dst(plan.source, dst, fingerprint, resume=resume, overwrite=overwrite)
        (dst / distributed.FAIL_FILE).unlink(missing_ok=True)  # left by an earlier failed torchrun job
        write_manifest(dst, fingerprint, found, complete=False)
        return found

    done = _on_rank0(ctx, prepare)
    pending = [s for s in plan.shards if s not in done]
    mine = pending
    if ctx is not None:
        assigned = set(distributed.assign_shards({s: _needed_bytes(plan, [s]) for s in pending}, ctx.world)[ctx.rank])
        mine = [s for s in pending if s in assigned]
    summary = RunSummary(plan.totals(), device=str(dev), shards_skipped=len(done),
                         verify=VerifyReport(calibration=plan.settings.calib.describe()) if verify_samples else None)
    t_start = time.perf_counter()
    error = None
    try:
        _stream_shards(plan, dst, mine, pending, transform, dev, ctx, fingerprint, progress, summary)
    except BaseException as e:  # noqa: BLE001 - decided below, after the other ranks are told
        error = _translated(e, plan, dst, pending, summary)
        if ctx is None:
            raise error from None
        if not isinstance(error, distributed.RankAborted):
            distributed.record_failure(dst, ctx.rank, str(error))
    if ctx is not None:
        # every rank has stopped streaming; rank 0's summary counts the whole job
        stats = ctx.gather((summary.bytes_in, summary.bytes_out, summary.shards_written))
        if rank0:
            summary.bytes_in, summary.bytes_out, summary.shards_written = (sum(x) for x in zip(*stats))
            summary.notes.append(f"ranks     {ctx.world} (torchrun), shards written per rank: "
                                 f"{', '.join(str(x[2]) for x in stats)}")
        failed = distributed.failure(dst)
        if failed is not None:
            if rank0:
                raise OutputError(f"rank {failed['rank']} of {ctx.world} failed: {failed['error']}")
            raise distributed.RankAborted(failed["error"])
    if rank0:
        if verify_samples:
            # After the streams are drained, so the check adds nothing to the pipeline's peak memory.
            for shard in pending:
                _verify_shard(plan, dst / shard, plan.shard_tensors(shard), verify_samples, summary.verify)
        _finish(plan, dst, fingerprint, finalize_config, extra_files, skip_files, summary)
    if ctx is not None:
        ctx.gather(True)  # nobody leaves before rank 0 has written the index and config
    summary.wall_s = time.perf_counter() - t_start
    return summary


def _on_rank0(ctx, fn):
    """Run `fn` (which returns a set of shard names) on rank 0 only and share its result or error."""
    if ctx is None:
        return fn()
    result, err = None, None
    if ctx.rank == 0:
        try:
            result = sorted(fn())
        except Exception as e:  # noqa: BLE001 - re-raised below on rank 0, reported as abort elsewhere
            err = e
    shared, message = ctx.gather((result, None if err is None else str(err)))[0]
    if message is not None:
        if err is not None:
            raise err
        raise distributed.RankAborted(message)
    return set(shared)


def _translated(e: BaseException, plan: Plan, dst: Path, pending: list[str], summary: RunSummary) -> BaseException:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        free = shutil.disk_usage(dst).free
        return OutputError(f"{dst}: no space left on device after {summary.bytes_out:,} bytes written: the "
                           f"output needs {_needed_bytes(plan, pending):,} bytes for the shards still to write, "
                           f"{free:,} are free; free space and run again with --resume")
    return e


def _stream_shards(plan, dst, shards, pending, transform, dev, ctx, fingerprint, progress, summary) -> None:
    """Read, transform and write `shards` with overlapping reader / compute / writer stages."""
    ckpt = plan.checkpoint
    by_shard = {s: plan.shard_tensors(s) for s in shards}
    needed, free = _needed_bytes(plan, shards), shutil.disk_usage(dst).free
    if needed > free:
        raise OutputError(f"{dst}: the output needs {needed:,} bytes for {len(shards)} shard(s), only {free:,} "
                          "are free on that file system")
    record = ManifestRecord(dst, fingerprint, ctx)
    work = [t for s in shards for t in by_shard[s]]
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm import tqdm

    total = sum(t.nbytes_in for s in (pending if ctx is not None else shards) for t in plan.shard_tensors(s))
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="fp8norm", dynamic_ncols=True,
               disable=not progress or (ctx is not None and ctx.rank != 0))
    share = distributed.ProgressShare(dst, ctx, bar) if ctx is not None else None
    log_lines = ctx is not None and not sys.stderr.isatty()
    stop = threading.Event()
    errors: list[BaseException] = []
    budget = max(1, plan.max_shard_size // 2)
    in_budget, out_budget = _ByteBudget(budget), _ByteBudget(budget)
    q_in: queue.Queue = queue.Queue()
    q_out: queue.Queue = queue.Queue()

    def fail(e: BaseException) -> None:
        errors.append(e)
        stop.set()

    def reader():
        handles = {}
        try:
            for t in work:
                if stop.is_set():
                    return
                in_budget.acquire(t.nbytes_in, stop)
                t0 = time.perf_counter()
                xs = []
                for name in t.input_names:
                    info = ckpt.tensors[name]
                    f = handles.get(info.file) or handles.setdefault(info.file, open(info.file, "rb"))
                    xs.append(read_tensor(info, f))
                summary.read_s += time.perf_counter() - t0
                q_in.put((t, xs))
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            fail(e)
        finally:
            for f in handles.values():
                f.close()
            q_in.put(_DONE)

    def writer():
        remaining = {s: len(by_shard[s]) for s in shards}
        current: ShardWriter | None = None
        try:
            while True:
                item = q_out.get()
                if item is _DONE or stop.is_set():
                    return
                t, outs, nbytes = item
                t0 = time.perf_counter()
                if current is None:
                    current = ShardWriter(dst / t.shard, [o for u in by_shard[t.shard] for o in u.outputs])
                for o, tensor in zip(t.outputs, outs):
                    summary.bytes_out += current.write(o.name, tensor)
                remaining[t.shard] -= 1
                if remaining[t.shard] == 0:
                    current.commit()
                    current = None
                    record.finished(t.shard)
                    summary.shards_written += 1
                    if log_lines:
                        print(f"fp8norm rank {ctx.rank}/{ctx.world}: wrote {t.shard} "
                              f"({summary.shards_written}/{len(shards)})", file=sys.stderr, flush=True)
                summary.write_s += time.perf_counter() - t0
                out_budget.release(nbytes)
        except BaseException as e:  # noqa: BLE001
            fail(e)
        finally:
            if current is not None:
                current.abort()

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for th in threads:
        th.start()
    try:
        while True:
            item = q_in.get()
            if item is _DONE or stop.is_set():
                break
            if ctx is not None and distributed.failure(dst) is not None:
                raise distributed.RankAborted("another rank failed")
            _faults.maybe_fail_rank(ctx)
            t, xs = item
            t0 = time.perf_counter()
            outs = transform(t, xs, plan, dev)
            summary.compute_s += time.perf_counter() - t0
            in_budget.release(t.nbytes_in)
            del xs, item
            nbytes = sum(o.nbytes for o in t.outputs)
            out_budget.acquire(nbytes, stop)
            q_out.put((t, outs, nbytes))
            summary.bytes_in += t.nbytes_in
            if share is not None:
                share.update(t.nbytes_in)
            else:
                bar.update(t.nbytes_in)
    except BaseException as e:  # noqa: BLE001
        fail(e)
    finally:
        q_out.put(_DONE)
        for th in threads:
            th.join()
        if share is not None:
            share.close()
        bar.close()
    if errors:
        raise errors[0]


def _finish(plan, dst, fingerprint, finalize_config, extra_files, skip_files, summary) -> None:
    """Rank 0, once every shard is on disk: other files, index, config, extra files, final manifest."""
    _copy_other_files(plan, dst, skip=skip_files)
    weight_map = {o.name: t.shard for t in plan.tensors for o in t.outputs}
    index = {"metadata": {"total_size": sum(t.nbytes_out for t in plan.tensors)},
             "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(dst / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    cfg_path = plan.source / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if finalize_config is not None:
            cfg = finalize_config(cfg, plan)
        atomic_write_text(dst / "config.json", json.dumps(cfg, indent=2) + "\n")
    else:
        summary.notes.append("note      the source has no config.json: none written")
    for name, text in (extra_files or {}).items():
        atomic_write_text(dst / name, text)
    write_manifest(dst, fingerprint, plan.shards, complete=True)
    drop_rank_manifests(dst)  # folded into the manifest above
    shutil.rmtree(dst / distributed.PROGRESS_DIR, ignore_errors=True)


def _verify_shard(plan: Plan, shard_path: Path, tensors: list[TensorPlan], samples: int,
                  report: VerifyReport) -> None:
    """Re-read `samples` FP8 tensors of a finished shard from disk and compare them with the source."""
    infos, _ = read_header(shard_path)
    fp8 = [t for t in tensors if t.decision == FP8]
    rng = random.Random(shard_path.name)
    for t in sorted(rng.sample(fp8, min(samples, len(fp8))), key=lambda t: t.name):
        q = read_tensor(infos[t.outputs[0].name])
        scale_inv = read_tensor(infos[t.outputs[1].name])
        src = read_tensor(plan.checkpoint.tensors[t.name])
        report.checks.append(compare(t.name, shard_path.name, q, scale_inv, src, plan.settings.block_size, Bands()))
    report.fp8_tensors += len(fp8)
    report.kept_tensors += len(tensors) - len(fp8)


def _copy_other_files(plan: Plan, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Tokenizer, chat template, generation config, code, subfolders: copied (config.json is rewritten;
    top-level files named in `skip` are replaced by the caller)."""
    for rel in plan.checkpoint.other_files:
        if rel == Path("config.json") or rel.name == MANIFEST_NAME or str(rel) in skip:
            continue
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial")
        shutil.copyfile(plan.source / rel, tmp)
        os.replace(tmp, out)
