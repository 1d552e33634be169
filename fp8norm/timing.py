"""Seconds since fp8norm started in this process, for the `stages` line (first byte read after start).

The clock starts when this module is first imported: the command line imports it before anything else
of fp8norm. (The process's own start time in /proc is its fork, which `bash -c '... && fp8norm ...'`
places at the start of the whole chain: the shell execs its last command in the same process.)"""

from __future__ import annotations

import time

STARTED = time.perf_counter()


def since_start() -> float:
    return time.perf_counter() - STARTED
