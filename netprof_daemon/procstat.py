"""CPU and memory of profiled processes, from /proc (the guide's monitoring list)."""

from __future__ import annotations

import os
import time

__all__ = ("ProcessUsage", "read_rss_bytes")

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields count from the last ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def read_rss_bytes(pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


class ProcessUsage:
    """CPU % of each process between two readings (one per tick), and its RSS."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, int]] = {}
        self.cpu_percent: dict[int, float] = {}

    def sample(self, pids: set[int]) -> None:
        now = time.monotonic()
        for pid in pids:
            ticks = _cpu_ticks(pid)
            if ticks is None:
                continue
            previous = self._last.get(pid)
            if previous is not None and now > previous[0]:
                used = (ticks - previous[1]) / _CLOCK_TICKS
                self.cpu_percent[pid] = round(100.0 * used / (now - previous[0]), 2)
            self._last[pid] = (now, ticks)
        for pid in set(self._last) - pids:
            del self._last[pid]
            self.cpu_percent.pop(pid, None)

    def usage(self, pid: int) -> dict[str, float | None]:
        rss = read_rss_bytes(pid)
        return {
            "cpu_percent": self.cpu_percent.get(pid),
            "rss_mb": round(rss / 2**20, 2) if rss is not None else None,
        }
