"""Fault injection for crash tests: `FP8NORM_KILL_AT=N` makes the process SIGKILL itself at the N-th
fault point it passes (points sit before and after every file write, mid-shard and between shards).
`FP8NORM_COUNT_POINTS=FILE` records the number of points passed, so a test can enumerate them;
`FP8NORM_KILL_RANK=R` limits the kill to torchrun rank R. `FP8NORM_PAUSE_AT=LABEL:N` with
`FP8NORM_PAUSE_FILE=F` pauses instead: at the N-th point labelled LABEL (e.g. tensor-written:3,
shard-renamed:1) the process creates F and waits until F is removed (concurrent-run tests hold a run
at a chosen moment this way).
Unset (always, outside tests), a point costs a few dict lookups.
"""

import os
import signal
import time

_passed = 0
_labels: dict[str, int] = {}


def point(label: str = "") -> None:
    global _passed
    kill_at = os.environ.get("FP8NORM_KILL_AT")
    kill_rank = os.environ.get("FP8NORM_KILL_RANK")
    if kill_rank is not None and os.environ.get("RANK", "0") != kill_rank:
        kill_at = None
    count_file = os.environ.get("FP8NORM_COUNT_POINTS")
    pause_at = os.environ.get("FP8NORM_PAUSE_AT")
    if kill_at is None and count_file is None and pause_at is None:
        return
    _passed += 1
    _labels[label] = _labels.get(label, 0) + 1
    if pause_at is not None and pause_at == f"{label}:{_labels[label]}":
        flag = os.environ["FP8NORM_PAUSE_FILE"]
        open(flag, "w").close()
        while os.path.exists(flag):
            time.sleep(0.05)
    if count_file:
        with open(count_file, "w") as f:
            f.write(str(_passed))
    if kill_at is not None and _passed == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_fail_rank(ctx) -> None:
    """`FP8NORM_FAIL_RANK=R`: rank R raises at its first tensor (tests of distributed error handling)."""
    fail_rank = os.environ.get("FP8NORM_FAIL_RANK")
    if fail_rank is not None and ctx is not None and ctx.rank == int(fail_rank):
        raise RuntimeError(f"injected failure on rank {ctx.rank}")
