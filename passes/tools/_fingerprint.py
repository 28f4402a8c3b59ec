"""A hash of the compiler's own sources, for caches that must go stale with a new compiler."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["compiler_fingerprint"]


def compiler_fingerprint(root: Path | None = None) -> str:
    """A hash of the compiler's sources (IR, passes, target profiles) under ``root`` (the repository)."""
    root = root or Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in ("ir", "passes", "targets"):
        for path in sorted((root / pkg).rglob("*")):
            if path.suffix in (".py", ".toml") and path.is_file():
                h.update(path.relative_to(root).as_posix().encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:12]
