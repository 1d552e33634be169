"""Seconds since this process was launched (its start time in /proc), for the `stages` line."""

from __future__ import annotations

import os


def since_launch() -> float | None:
    """Wall seconds since the kernel started this process (10 ms resolution); None off Linux."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
