"""Architecture boundary: only ``ir/lower.py`` and ``ir/emit.py`` import ``onnx``.

Scans every Python source file of ``ir/``, ``passes/`` and ``targets/`` with :mod:`ast` (not a grep:
comments and strings do not count, and ``import onnx.helper as h``, ``from onnx import x``,
function-level imports, ``importlib.import_module("onnx")`` and ``__import__("onnx")`` all do).
``onnxruntime``, ``onnx_graphsurgeon``, ``onnxscript`` and ``torch.onnx`` are other packages and
are not covered by the rule.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("ir", "passes", "targets")
ALLOWED = {"ir/lower.py", "ir/emit.py"}


def _is_onnx(module: str | None) -> bool:
    return module is not None and (module == "onnx" or module.startswith("onnx."))


def onnx_imports(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """The ``(line, statement)`` pairs of ``source`` that import the ``onnx`` package."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _is_onnx(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _is_onnx(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            arg = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(arg, str) and _is_onnx(arg):
                found.append((node.lineno, f"{name}({arg!r})"))
    return found


def _sources() -> list[pathlib.Path]:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def test_only_lower_and_emit_import_onnx() -> None:
    """No module of ir/, passes/ or targets/ other than ir/lower.py and ir/emit.py imports onnx."""
    files = _sources()
    assert any(p.relative_to(ROOT).as_posix() == "ir/lower.py" for p in files)
    offenders = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        for line, stmt in onnx_imports(path.read_text(encoding="utf-8"), rel):
            offenders.append(f"{rel}:{line}: {stmt}")
    assert not offenders, "only ir/lower.py and ir/emit.py may import onnx; speak IR elsewhere:\n" + "\n".join(
        offenders
    )


def test_lower_and_emit_do_import_onnx() -> None:
    """The scanner sees the two legitimate imports (so it is not vacuously passing)."""
    for rel in ALLOWED:
        assert onnx_imports((ROOT / rel).read_text(encoding="utf-8"), rel), rel


@pytest.mark.parametrize(
    "source",
    [
        "import onnx",
        "import onnx.helper as h",
        "import os, onnx",
        "from onnx import numpy_helper",
        "from onnx.reference import ReferenceEvaluator",
        "def f():\n    import onnx\n    return onnx",
        "import importlib\nm = importlib.import_module('onnx.helper')",
        "m = __import__('onnx')",
        "try:\n    import onnx\nexcept ImportError:\n    onnx = None",
    ],
)
def test_scanner_catches(source: str) -> None:
    """Every way of importing onnx is caught."""
    assert onnx_imports(source)


@pytest.mark.parametrize(
    "source",
    [
        "import onnxruntime",
        "import onnx_graphsurgeon as gs",
        "from onnxscript import ir",
        "import torch.onnx",
        "from . import onnx",
        "# import onnx",
        "s = 'import onnx'",
    ],
)
def test_scanner_ignores(source: str) -> None:
    """Other packages, relative modules, comments and strings do not count."""
    assert not onnx_imports(source)

