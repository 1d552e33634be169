"""Execute a plan: quantize / convert / repack as jobs of the output engine (fp8norm.engine).

One job per planned tensor, written shard after shard; the engine overlaps reading, computing and
writing, keeps memory within about two half-shard buffers, and makes DST safe and resumable
(fp8norm.output). What each command makes of the plan is a Transform (output tensors, config.json,
extra files, notes). Index, config.json and the extra files are rendered, and so checked, before DST
is touched, and written once every shard is complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from . import distributed, read_ahead
from .checkpoint import INDEX_NAME, read_json
from .device import resolve_device
from .classify import FP8, Decision as D
from .engine import Job, RunStats, run_jobs
from .output import MANIFEST_NAME, PROVENANCE_NAME, OutputError, index_text
from .plan import Plan, TensorPlan
from .st_io import OutEntry
from .threads import compute_workers

if TYPE_CHECKING:  # (imported where used: `repack` copies tensors and never imports torch)
    import torch

    from .verify import VerifyReport

__all__ = ["execute_plan", "Transform", "BlockQuantize", "RunSummary", "resolve_device", "quantize_tensor",
           "OutputError", "MANIFEST_NAME"]


_VERBS = {D.FP8: "quantized", D.KEEP: "kept", D.PASSTHROUGH: "passed through", D.DEQUANT: "dequantized",
          D.RELABEL: "relabelled", D.UE8M0: "to ue8m0 scales", D.NVFP4: "to NVFP4", D.SCHEME: "quantized"}


@dataclass
class RunSummary(RunStats):
    """The engine's figures for a plan's run (files = shards), with the plan's tensor counts (the whole
    output's, also when resumed) and the source directory the output was made from."""
    tensors: dict = field(default_factory=dict)
    device: str = "cpu"
    verify: VerifyReport | None = None
    source: Path | None = None

    def format(self) -> str:
        rate = self.bytes_in / max(self.wall_s, 1e-9)
        speed = f"{rate / 1e9:.2f} GB/s" if rate >= 1e9 else f"{rate / 1e6:.1f} MB/s"  # no "0.00 GB/s"
        counts = ", ".join(f"{n} {_VERBS.get(d, d)}" for d, n in self.tensors.items()
                           if d in _VERBS and (n or d == D.KEEP))
        resumed = self.files_skipped > 0  # the bytes and times are this run's, the tensor counts the output's
        lines = [
            f"tensors   {counts}{' in the whole output' if resumed else ''}",
            f"bytes     {self.bytes_in / 1e9:.3f} GB in -> {self.bytes_out / 1e9:.3f} GB out"
            f"{' now' if resumed else ''} ({self.files_written} shard(s) written, {self.files_skipped} already done)",
            f"time      {self.wall_s:.2f} s wall: read {self.read_s:.2f} s, compute {self.compute_s:.2f} s "
            f"({self.device}), write {self.write_s:.2f} s; {speed}",
            self.format_stages(),
        ]
        return "\n".join(lines + self.notes)


    def format_stages(self) -> str:
        """Where read and write time went, the check after writing, and how long the start took."""
        launch = f", first read {self.first_read_s:.2f} s after start" if self.first_read_s is not None else ""
        if (ahead := read_ahead.LAST.describe()) is not None:
            launch += f"; {ahead}"
        return (f"stages    hash {self.hash_s:.2f} s (read + write), fsync {self.fsync_s:.2f} s, verify "
                f"{self.verify_s:.2f} s{launch}")


def quantize_tensor(t: TensorPlan, xs: list[torch.Tensor], plan: Plan, device: torch.device) -> list[torch.Tensor]:
    """The output tensors of one planned tensor (inputs `xs`), in the order of t.outputs."""
    from .activation_stats import weights_for
    from .calibrate import calibrated_quant

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


class Transform:
    """What a writing command makes of its plan: the output tensors of a planned tensor (`outputs` when
    planning, `apply` when running: in the order of t.outputs), config.json (`config`), the files
    written beside it (`extra_files`; `skip_files`: source files not copied) and summary lines from
    `records` (`notes`). This base copies every tensor as it is (repack)."""
    skip_files: tuple[str, ...] = ()

    def __init__(self):
        self.records: list = []  # what `apply` notes, on any rank; the engine gathers every rank's

    def outputs(self, t: TensorPlan) -> list[OutEntry]:
        return [OutEntry(t.name, t.dtype, t.shape)]

    def apply(self, t: TensorPlan, xs: list[torch.Tensor], plan: Plan, device: torch.device) -> list[torch.Tensor]:
        return xs

    @property
    def copies_as_is(self) -> bool:
        """Every output is its source tensor as it is (this base's `apply`): the engine then copies
        the bytes file to file (fp8norm.engine's copy jobs) instead of reading them."""
        return type(self).apply is Transform.apply

    def config(self, cfg: dict, plan: Plan) -> dict:
        return cfg

    def extra_files(self, plan: Plan) -> dict[str, str]:
        return {}

    def notes(self) -> list[str]:
        return []


class BlockQuantize(Transform):
    """Block FP8 for the tensors planned fp8, the others as they are."""

    def apply(self, t, xs, plan, device):
        return quantize_tensor(t, xs, plan, device)


def execute_plan(plan: Plan, dst: str | Path, *, transform: Transform | None = None, device: str = "auto",
                 resume: bool = False, overwrite: bool = False, progress: bool | None = None,
                 verify_samples: int = 0) -> RunSummary:
    """Write `plan`'s output into `dst`.

    `transform` (a Transform; None: BlockQuantize) makes each planned tensor's output tensors,
    config.json, the files beside it and the summary's notes. `verify_samples` freshly rounded tensors
    of each shard are re-read from disk once all shards are complete and compared with the source
    (summary.verify holds the report); a resumed run samples the shards an earlier run wrote too, so its
    report covers the whole output, as a clean run's does. Under torchrun the shards are shared out between the
    ranks (see fp8norm.distributed). Everything that can be checked (device, config.json, the output
    texts) is checked before DST is touched.
    """
    transform = transform or BlockQuantize()
    if verify_samples < 0:
        raise OutputError(f"verify_samples must be >= 0, got {verify_samples}")
    dst = Path(dst)
    # copying tensors as they are needs no device (and no torch)
    dev = None if transform.copies_as_is else resolve_device(device, distributed.context())
    on_gpu = dev is not None and dev.type == "cuda"
    texts, copies = _output_texts(plan, transform)
    by_shard: dict[str, list[TensorPlan]] = {s: [] for s in plan.shards}
    for t in plan.tensors:
        by_shard[t.shard].append(t)
    jobs = [Job(t.input_names, [(t.shard, o) for o in t.outputs],
                None if transform.copies_as_is else lambda xs, _which, t=t: transform.apply(t, xs, plan, dev))
            for s in plan.shards for t in by_shard[s]]
    summary = RunSummary(tensors=plan.totals(), device=str(dev or "cpu"), source=plan.source)

    def check_after_writing(_written: list[str], out_dir: Path) -> dict[str, str]:
        # After the streams are drained, so the check adds nothing to the pipeline's peak memory
        from .verify import FAIL, check_written, mark_failed

        summary.verify = check_written(plan, out_dir, by_shard, verify_samples,
                                       workers=1 if on_gpu else compute_workers())
        if summary.verify.status == FAIL and PROVENANCE_NAME in texts:
            # the output stays, marked as failed (the CLI exits EXIT_VERIFY_FAILED)
            return {PROVENANCE_NAME: mark_failed(texts[PROVENANCE_NAME], summary.verify)}
        return {}

    run_jobs(plan.checkpoint, jobs, dst, fingerprint=plan.fingerprint(), resume=resume, overwrite=overwrite,
             progress=progress, buffer_bytes=max(1, plan.max_shard_size // 2), texts=texts, copies=copies,
             before_finish=check_after_writing if verify_samples else None, notes=transform.records, stats=summary,
             workers=1 if on_gpu else None)  # one GPU stream: a second worker would only queue
    if not (plan.source / "config.json").exists():
        summary.notes.append("note      the source has no config.json: none written")
    summary.notes += plan.notes + transform.notes()
    return summary


def _output_texts(plan: Plan, transform: Transform) -> tuple[dict[str, str], list[Path]]:
    """The index, config.json and extra files (in writing order), and the source files to copy."""
    weight_map = {o.name: t.shard for t in plan.tensors for o in t.outputs}
    texts = {INDEX_NAME: index_text(weight_map, sum(t.nbytes_out for t in plan.tensors))}
    cfg_path = plan.source / "config.json"
    if cfg_path.exists():
        texts["config.json"] = json.dumps(transform.config(read_json(cfg_path, "config.json"), plan), indent=2) + "\n"
    texts.update(transform.extra_files(plan))
    skip = {*texts, *transform.skip_files, MANIFEST_NAME}
    copies = [rel for rel in plan.checkpoint.other_files if str(rel) not in skip and rel.name != MANIFEST_NAME]
    return texts, copies
