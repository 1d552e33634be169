"""Fault injection for crash tests: `FP8NORM_KILL_AT=N` makes the process SIGKILL itself at the N-th
fault point it passes (points sit before and after every file write, mid-shard and between shards).
`FP8NORM_COUNT_POINTS=FILE` appends the number of points passed, so a test can enumerate them.
Unset (always, outside tests), a point costs one dict lookup.
"""

import os
import signal

_passed = 0


def point(_label: str = "") -> None:
    global _passed
    kill_at = os.environ.get("FP8NORM_KILL_AT")
    count_file = os.environ.get("FP8NORM_COUNT_POINTS")
    if kill_at is None and count_file is None:
        return
    _passed += 1
    if count_file:
        with open(count_file, "w") as f:
            f.write(str(_passed))
    if kill_at is not None and _passed == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
