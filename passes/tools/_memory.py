"""Peak resident memory of the phases of a compilation (the report's ``peak RSS`` line)."""

from __future__ import annotations

import resource
import sys

__all__ = ["PeakRSS"]


class PeakRSS:
    """Peak resident memory of successive phases of this process.

    On Linux each phase starts by resetting the kernel's high-water mark (``/proc/self/clear_refs``)
    and ends by reading it (``VmHWM``), so a phase's peak is its own; elsewhere (or when the reset is
    refused) it is the process's peak so far (``ru_maxrss``), which only grows.
    """

    def __init__(self) -> None:
        self.phases: dict[str, int] = {}

    @staticmethod
    def _reset() -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    @staticmethod
    def _peak() -> int:
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return rss if sys.platform == "darwin" else rss * 1024

    def start(self) -> None:
        """Begin a phase."""
        self._reset()

    def end(self, name: str) -> None:
        """End the phase ``name``: record its peak."""
        self.phases[name] = max(self.phases.get(name, 0), self._peak())
