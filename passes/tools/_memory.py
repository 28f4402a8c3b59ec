"""Peak resident memory of the phases of a compilation (the report's ``peak RSS`` line)."""

from __future__ import annotations

import resource
import sys

__all__ = ["PeakRSS"]


class PeakRSS:
    """Peak resident memory of this process at the end of successive phases.

    The kernel's high-water mark (``VmHWM`` on Linux, else ``ru_maxrss``) only grows, and it is never
    reset here: resetting it (``/proc/self/clear_refs``) would also reset the ``ru_maxrss`` that a
    parent reads with ``RUSAGE_CHILDREN`` (the benchmarks). So each phase records the peak so far;
    the first phase at the maximum is the one that set the peak.
    """

    def __init__(self) -> None:
        self.phases: dict[str, int] = {}

    @staticmethod
    def peak() -> int:
        """This process's peak resident memory so far, in bytes."""
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return rss if sys.platform == "darwin" else rss * 1024

    def end(self, name: str) -> None:
        """End the phase ``name``: record the peak so far."""
        self.phases[name] = self.peak()
