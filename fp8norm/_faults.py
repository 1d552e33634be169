"""Fault injection for crash tests: `FP8NORM_KILL_AT=N` makes the process SIGKILL itself at the N-th
fault point it passes (points sit before and after every file write, mid-shard and between shards).
`FP8NORM_COUNT_POINTS=FILE` records the number of points passed, so a test can enumerate them;
`FP8NORM_KILL_RANK=R` limits the kill to torchrun rank R.
Unset (always, outside tests), a point costs one dict lookup.
"""

import os
import signal

_passed = 0


def point(_label: str = "") -> None:
    global _passed
    kill_at = os.environ.get("FP8NORM_KILL_AT")
    kill_rank = os.environ.get("FP8NORM_KILL_RANK")
    if kill_rank is not None and os.environ.get("RANK", "0") != kill_rank:
        kill_at = None
    count_file = os.environ.get("FP8NORM_COUNT_POINTS")
    if kill_at is None and count_file is None:
        return
    _passed += 1
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
