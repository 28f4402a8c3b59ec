"""Hardware target profiles.

Each target is a TOML file in ``targets/profiles/``: the ops its runtime provides, dtypes, the
quantization policy and the default pipeline. ``get("x86")`` returns one; ``get("native")`` picks
the host's from its CPU flags. Adding a target is adding a file.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

from ._target import PolicyVariant, QuantPolicy, Target, TargetError, load_target_file

__all__ = ["Target", "QuantPolicy", "PolicyVariant", "TargetError", "get", "all_targets", "native_name"]

_DIR = Path(__file__).parent / "profiles"


@lru_cache(maxsize=1)
def all_targets() -> dict[str, Target]:
    """Every shipped target by canonical name (plus files in ``$TFCOMPILE_TARGETS_DIR``)."""
    dirs = [_DIR]
    extra = os.environ.get("TFCOMPILE_TARGETS_DIR")
    if extra:
        dirs.append(Path(extra))
    out: dict[str, Target] = {}
    for d in dirs:
        for path in sorted(d.glob("*.toml")):
            t = load_target_file(path)
            out[t.name] = t
    return out


def native_name(cpu_flags: set[str] | None = None, machine: str | None = None) -> str:
    """The name of the target that fits this host (or the given flags and machine).

    A target fits when the machine is one of its ``machine`` names (or it names none) and the
    host has one of its ``cpu_flags`` (or it needs none); the highest ``native_priority`` wins.
    """
    machine = (machine or platform.machine()).lower()
    if cpu_flags is None:
        cpu_flags = _host_flags()
    fits = [
        t for t in all_targets().values()
        if (not t.machine or machine in t.machine) and (not t.cpu_flags or any(f in cpu_flags for f in t.cpu_flags))
    ]
    if not fits:
        raise TargetError(f"no target fits this host ({machine}); pass --target explicitly")
    return max(fits, key=lambda t: (t.native_priority, t.name)).name


def _host_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def get(name: str) -> Target:
    """The target called ``name`` (or one of its aliases; ``native`` for this host).

    Raises:
        TargetError: listing the known targets.
    """
    targets = all_targets()
    if name == "native":
        name = native_name()
    if name in targets:
        return targets[name]
    for t in targets.values():
        if name in t.aliases:
            return t
    known = ", ".join(sorted(targets)) + ", native"
    raise TargetError(f"unknown target {name!r} (known targets: {known}; aliases: x86, aarch64, generic)")
