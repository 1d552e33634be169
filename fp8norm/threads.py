"""How many CPU threads torch's intra-op pool gets, chosen from what this process may really use.

torch's default is one thread per core of the machine, whatever the cgroup quota, the CPU
affinity, other torchrun ranks on the node, or fp8norm's own reader and writer threads. On a loaded
2-core box the result was 8-50x slower than one thread (threads spinning at every op's barrier for
cores they do not have). The rule here:

    usable   = min(len(os.sched_getaffinity(0)), ceil(cgroup cpu quota / period))
    per rank = usable // LOCAL_WORLD_SIZE              (torchrun ranks on this node share it)
    workers  = 2 where per rank >= 2, else 1           (the engine's compute workers, fp8norm.engine)
    threads  = max(1, (per rank - 1) // workers)       (intra-op threads of each)

The reader and writer threads mostly wait (measured on 1.5 GB, 2 cores: reading into reused buffers,
hashing and writing take < 1 s of CPU against 3-5 s of compute), so they get one core between them,
not one each. Two workers compute two jobs side by side, each with its own intra-op threads: on a
2-core box that is 2 x 1 thread, with no barrier between the workers, so a core taken by another
process slows them down rather than stalling every op (the collapse above). `io_threads=0` (no
pipeline: all CPUs, one worker) is for callers that compute alone.

`--threads N` (or `threads=N`) sets the intra-op threads of one worker; OMP_NUM_THREADS set outside
torchrun is honoured the same way (torchrun sets it to 1 itself, so under torchrun the rule above
applies).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

IO_THREADS = 2  # the pipeline's reader and writer (fp8norm.engine); together they get one core

_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    why: str
    workers: int = 1  # compute workers of the engine, each with `threads` intra-op threads

    def describe(self) -> str:
        workers = f"{self.workers} compute workers x " if self.workers > 1 else ""
        return f"{workers}{self.threads} intra-op thread(s): {self.why}"


def cgroup_cpu_limit(v2: Path = _CGROUP_V2, v1: tuple[Path, Path] = _CGROUP_V1) -> float | None:
    """CPUs the cgroup quota allows (e.g. 2.5), or None when unlimited or unknown."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota, period = int(v1[0].read_text()), int(v1[1].read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def choose_threads(requested: int | None = None, *, io_threads: int = IO_THREADS, env=None) -> ThreadChoice:
    env = os.environ if env is None else env
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return ThreadChoice(requested, "--threads")
    under_torchrun = "LOCAL_WORLD_SIZE" in env
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0 and not under_torchrun:
        return ThreadChoice(int(omp), "OMP_NUM_THREADS")
    cpus = usable_cpus()
    ranks = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    per_rank = max(1, cpus // ranks)
    where = f"{cpus} usable CPU(s)" + (f" / {ranks} ranks on this node" if ranks > 1 else "")
    if not io_threads:
        return ThreadChoice(per_rank, where)
    workers = 2 if per_rank >= 2 else 1
    n = max(1, (per_rank - 1) // workers)
    return ThreadChoice(n, f"{where}, 1 left for the reader/writer threads (mostly waiting on I/O)", workers)


_configured: ThreadChoice | None = None


def configure_threads(requested: int | None = None, *, torch_pool: bool = True, **kw) -> ThreadChoice:
    """Choose (see the module doc) and apply to torch's intra-op pool (`torch_pool` False: a command
    that computes nothing with torch, e.g. repack, which never imports it); returns the choice."""
    global _configured
    choice = choose_threads(requested, **kw)
    if torch_pool:
        import torch

        if torch.get_num_threads() != choice.threads:
            torch.set_num_threads(choice.threads)
    _configured = choice
    return choice


def compute_workers() -> int:
    """The engine's compute workers: those of the configured choice (the CLI configures it while
    parsing), else 1 (a library caller keeps torch's pool as it set it)."""
    return _configured.workers if _configured is not None else 1
