"""``python -m passes.compile``: the main command, kept at its historical path.

The command lives in :mod:`passes.tools.compile`; ``tfcompile compile`` runs the same code.
"""

from __future__ import annotations

from .tools.compile import CompileReport, CompileResult, compile_model, main

__all__ = ["CompileReport", "CompileResult", "compile_model", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
