"""The folder tree is the architecture (DESIGN 15a): checked from the sources, without importing them.

* no import cycles among the modules of ``passes/`` (every ``import`` statement counts, also those
  inside functions and ``if TYPE_CHECKING:`` blocks: a lazy import only hides a cycle);
* no pass module reaches ``passes.tools`` (the commands sit on top of the passes, never below);
* every registered pass lives in a public module of a pass package, one pass class a module.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "passes"
PASS_PACKAGES = ("passes.cleanup", "passes.fusions", "passes.quantization")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, pathlib.Path] = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Modules of ``passes`` that ``name`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module)
            # ``from pkg import sub`` imports the submodule ``pkg.sub``; other names come from ``pkg``.
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        for t in targets:
            # ``import passes.fusions.attention`` names the deepest module that exists.
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH: dict[str, set[str]] = {name: _imports(name, path) for name, path in MODULES.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a closed path ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)) is not None:
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)) is not None:
            return cycle
    return None


def _reachable(start: str) -> dict[str, str]:
    """Modules reachable from ``start``, each with the module that imports it on one path."""
    via: dict[str, str] = {}
    todo = [start]
    while todo:
        n = todo.pop()
        for m in GRAPH.get(n, ()):
            if m not in via and m != start:
                via[m] = n
                todo.append(m)
    return via


def _pass_modules() -> list[str]:
    return [n for n in MODULES if n.rpartition(".")[0] in PASS_PACKAGES and not n.rpartition(".")[2].startswith("_")]


def test_graph_sees_the_known_edges() -> None:
    # The graph builder itself: relative, parent-relative and function-level imports.
    assert "passes.framework.registry" in GRAPH["passes.fusions.attention"]
    assert "passes.framework.base" in GRAPH["passes.framework.registry"]
    assert "passes.tools.compile" in GRAPH["passes"]  # lazy, inside __getattr__
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", _pass_modules())
def test_pass_modules_do_not_reach_the_tools(module: str) -> None:
    via = _reachable(module)
    tools = sorted(m for m in via if m == "passes.tools" or m.startswith("passes.tools."))
    if tools:
        path, m = [tools[0]], tools[0]
        while m in via:
            m = via[m]
            path.append(m)
        pytest.fail(f"{module} imports the tools: " + " -> ".join(reversed(path)))


def test_registered_passes_live_one_per_public_pass_module() -> None:
    from passes import registered_passes

    by_module: dict[str, list[str]] = {}
    for name, cls in registered_passes().items():
        by_module.setdefault(cls.__module__, []).append(name)
    builtin = {m: names for m, names in by_module.items() if m.startswith("passes.")}
    assert builtin, "no built-in pass registered"
    for module, names in builtin.items():
        pkg, _, leaf = module.rpartition(".")
        assert pkg in PASS_PACKAGES and not leaf.startswith("_"), (
            f"pass {names[0]!r} lives in {module}, not in a public module of {', '.join(PASS_PACKAGES)}")
        assert len(names) == 1, f"{module} holds {len(names)} passes ({', '.join(sorted(names))}): one a module"

