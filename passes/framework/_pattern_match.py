"""The matcher of pattern rules: backtracking over alternatives, operand orders and products.

Matching never mutates the IR; a failure records the reason of the attempt that got furthest.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

import ir

from ._pattern_terms import (
    _MISSING, COMMUTATIVE, Alternatives, Const, NodeOutput, Pattern, Product, Through, Var, _attr_equal, _norm_attr,
    _norm_domain, build_pattern, capture,
)
from .match import const_array, only_users, single_use

__all__ = ["Match", "CompiledPattern", "Failure"]


# ----------------------------------------------------------------------------------------- #
# Matching
# ----------------------------------------------------------------------------------------- #


class Match:
    """A successful match: the root, the matched nodes and what the variables bound to.

    Bound values read as attributes (``m.x``) or items (``m["x"]``); a variable of an alternative
    that was not taken reads ``None``. ``m.node("mean")`` is the node matched by ``_name="mean"``,
    ``m.chain("layout")`` the nodes of ``op.through(..., _name="layout")``.
    """

    __slots__ = ("root", "nodes", "values", "attrs", "named", "chains", "rule")

    def __init__(self, root: ir.Node | None, nodes: list[ir.Node], values: dict[str, Any], attrs: dict[str, Any],
                 named: dict[str, Any], rule: Any) -> None:  # rule: the PatternRule (or CompiledPattern)
        self.root = root
        self.nodes = nodes
        self.values = values
        self.attrs = attrs
        # The matcher records a named chain as a tuple of nodes beside the named nodes.
        self.named: dict[str, ir.Node] = {k: v for k, v in named.items() if not isinstance(v, tuple)}
        self.chains: dict[str, list[ir.Node]] = {k: list(v) for k, v in named.items() if isinstance(v, tuple)}
        self.rule = rule

    def __getitem__(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        if name in self.attrs:
            return self.attrs[name]
        if name in self.rule.variables:
            return None
        raise KeyError(f"pattern {self.rule.name!r} binds no {name!r} (it binds {sorted(self.rule.variables)})")

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(str(e)) from None

    def node(self, name: str) -> ir.Node | None:
        """The node matched by the node pattern named ``name`` (``None`` when its alternative was not taken)."""
        return self.named.get(name)

    def chain(self, name: str) -> list[ir.Node] | None:
        """The nodes of the ``through`` named ``name``, from the use back (``None``: alternative not taken)."""
        return self.chains.get(name)

    def const(self, name: str) -> np.ndarray | None:
        """The constant data bound to ``name``, or ``None``."""
        return const_array(self[name])

    def opset(self, domain: str = "") -> int:
        """The model's imported opset version of ``domain`` (0 when not imported)."""
        return self.rule._opsets.get(_norm_domain(domain), 0)

    def read_elsewhere(self, name: str) -> bool:
        """Whether an output of the node named ``name`` is read outside the match (or is a model output)."""
        node, members = self.named.get(name), set(self.nodes)
        return node is not None and not all(o is None or only_users(o, members) for o in node.outputs)


class _State:
    """Mutable matching state with undo by the backtracking generators."""

    __slots__ = ("values", "attrs", "nodes", "used", "extra", "named", "best", "graph")

    def __init__(self, graph: ir.Graph | None) -> None:
        self.values: dict[str, Any] = {}
        self.attrs: dict[str, Any] = {}
        self.nodes: dict[int, ir.Node] = {}  # id(NodePattern) -> node
        self.used: set[ir.Node] = set()
        self.extra: list[ir.Node] = []  # nodes absorbed by products
        self.named: dict[str, ir.Node] = {}
        self.best: tuple[int, str] = (-1, "")
        self.graph = graph

    def fail(self, reason: str, extra: int = 0) -> None:
        """Record why matching stopped; ``extra`` counts nodes examined but not yet taken."""
        depth = len(self.used) + extra
        if depth > self.best[0]:
            self.best = (depth, reason)


def _what(v: ir.Value) -> str:
    p = v.producer()
    return f"%{v.name} from {p.label()}" if p is not None else f"%{v.name}"


def _match(pat: Pattern | None, value: ir.Value | None, st: _State) -> Iterator[None]:
    if pat is None:
        if value is None:
            yield
        else:
            st.fail(f"expected an omitted input, got {_what(value)}")
        return
    if isinstance(pat, Alternatives):
        for option in pat.options:
            yield from _match(option, value, st)
        return
    if value is None:
        st.fail("an input the pattern needs is omitted")
        return
    if isinstance(pat, Var):
        yield from _bind(pat.name, value, st)
        return
    if isinstance(pat, Const):
        yield from _match_const(pat, value, st)
        return
    if isinstance(pat, NodeOutput):
        yield from _match_node(pat, value, st)
        return
    if isinstance(pat, Product):
        yield from _match_product(pat, value, st)
        return
    if isinstance(pat, Through):
        yield from _match_through(pat, value, st)
        return
    raise TypeError(f"not a pattern: {pat!r}")


def _match_const(pat: Const, value: ir.Value, st: _State) -> Iterator[None]:
    arr = const_array(value)
    if arr is None or arr.dtype == object:
        st.fail(f"expected {pat.describe()}, got {_what(value)}")
        return
    if pat.ndim is not None and arr.ndim != pat.ndim:
        st.fail(f"expected {pat.describe()}, got a {arr.ndim}-D constant %{value.name}")
        return
    if pat.value is not None:
        want = np.asarray(pat.value, dtype=np.float64)
        try:
            got = arr.astype(np.float64)
            ok = (want.ndim == 0 and got.size == 1 and _close(float(got.reshape(-1)[0]), float(want), pat.rtol, pat.atol)) \
                or (want.ndim > 0 and got.size == want.size and np.allclose(got.reshape(-1), want.reshape(-1),
                                                                           rtol=pat.rtol, atol=pat.atol))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            shown = f"{float(arr.reshape(-1)[0]):g}" if arr.size == 1 else f"shape {list(arr.shape)}"
            st.fail(f"expected {pat.describe()}, got %{value.name} = {shown}")
            return
    if pat.predicate is not None and not pat.predicate(arr):
        st.fail(f"constant %{value.name} fails the pattern's predicate")
        return
    if pat.name is None:
        yield
        return
    yield from _bind(pat.name, value, st)


def _bind(name: str, value: ir.Value, st: _State) -> Iterator[None]:
    """Bind ``name`` to ``value`` for the rest of the match; a name bound before must be the same value."""
    bound = st.values.get(name, _MISSING)
    if bound is _MISSING:
        st.values[name] = value
        yield
        del st.values[name]
    elif bound is value:
        yield
    else:
        st.fail(f"{name} is %{bound.name} in one place and %{value.name} in another")


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def _match_node(pat: NodeOutput, value: ir.Value, st: _State) -> Iterator[None]:
    np_ = pat.node
    node = value.producer()
    if node is None or not np_.accepts(node.op_type) or node.domain != np_.domain:
        st.fail(f"expected {np_.describe()}, got {_what(value)}")
        return
    if value.index() != pat.index:
        st.fail(f"expected output {pat.index} of {node.label()}, got output {value.index()}")
        return
    seen = st.nodes.get(id(np_))
    if seen is not None:
        if seen is node:
            yield
        else:
            st.fail(f"one pattern node matched both {seen.label()} and {node.label()}")
        return
    if node in st.used or node.graph is not st.graph:
        st.fail(f"{node.label()} is matched twice or lives in another graph")
        return
    captured: list[str] = []
    for key, want in np_.attrs.items():
        got = node.attr(key)
        if isinstance(want, capture):
            st.attrs[want.name] = _norm_attr(got)
            captured.append(want.name)
            continue
        ok = bool(want(got)) if callable(want) else (got is not None and _attr_equal(got, want))
        if not ok:
            for c in captured:
                del st.attrs[c]
            # The node's op type matched: it counts towards how near the match came.
            st.fail(f"{node.label()}: attribute {key}={_norm_attr(got)!r} does not fit the pattern", extra=1)
            return
    if len(node.inputs) < len(np_.inputs) or (len(node.inputs) > len(np_.inputs) and np_.op_types is None
                                              and any(v is not None for v in node.inputs[len(np_.inputs):])):
        st.fail(f"{node.label()} has {len(node.inputs)} inputs, the pattern {len(np_.inputs)}")
    else:
        st.nodes[id(np_)] = node
        st.used.add(node)
        if np_.name:
            st.named[np_.name] = node
        inputs = node.inputs[: len(np_.inputs)]
        orders = [inputs]
        if node.op_type in COMMUTATIVE and len(inputs) == 2 and inputs[0] is not inputs[1]:
            orders.append((inputs[1], inputs[0]))
        for order in orders:
            yield from _match_all(np_.inputs, order, st)
        if np_.name:
            del st.named[np_.name]
        st.used.discard(node)
        del st.nodes[id(np_)]
    for c in captured:
        st.attrs.pop(c, None)


def _match_all(pats: Sequence[Pattern | None], values: Sequence[ir.Value | None], st: _State) -> Iterator[None]:
    if not pats:
        yield
        return
    for _ in _match(pats[0], values[0], st):
        yield from _match_all(pats[1:], values[1:], st)


def _flatten_product(value: ir.Value, st: _State) -> tuple[list[ir.Value], list[ir.Node], float] | None:
    """Leaves of the Mul/Div-by-constant tree rooted at ``value``'s producer (interior values read once)."""
    root = value.producer()
    if root is None or root.op_type not in ("Mul", "Div") or root.domain or root in st.used:
        return None
    nodes: list[ir.Node] = []
    leaves: list[ir.Value] = []
    scale = 1.0
    stack: list[tuple[ir.Value, bool]] = [(value, True)]
    while stack:
        v, is_root = stack.pop()
        p = v.producer()
        interior = is_root or single_use(v)
        if p is None or not interior or p.op_type not in ("Mul", "Div") or p.domain \
                or p.graph is not st.graph or p in st.used or len(p.inputs) != 2 or None in p.inputs:
            leaves.append(v)
            continue
        if p.op_type == "Div":
            d = const_array(p.inputs[1])
            if d is None or d.size != 1 or float(d.reshape(-1)[0]) == 0.0:
                if is_root:
                    return None
                leaves.append(v)
                continue
            scale /= float(d.reshape(-1)[0])
            nodes.append(p)
            stack.append((p.inputs[0], False))  # type: ignore[arg-type]
            continue
        nodes.append(p)
        stack.append((p.inputs[1], False))  # type: ignore[arg-type]
        stack.append((p.inputs[0], False))  # type: ignore[arg-type]
    return leaves, nodes, scale


def _match_product(pat: Product, value: ir.Value, st: _State) -> Iterator[None]:
    flat = _flatten_product(value, st)
    if flat is None:
        st.fail(f"expected a product, got {_what(value)}")
        return
    leaves, nodes, scale = flat
    rest: list[ir.Value] = []
    for v in leaves:
        arr = const_array(v)
        if arr is not None and arr.size == 1 and arr.dtype != object:
            scale *= float(arr.reshape(-1)[0])
        else:
            rest.append(v)
    if len(rest) != len(pat.factors):
        st.fail(f"the product at {_what(value)} has {len(rest)} non-constant factors, the pattern {len(pat.factors)}")
        return
    if not _close(scale, pat.scale, pat.rtol, 1e-12):
        st.fail(f"the product at {_what(value)} is scaled by {scale:g}, not {pat.scale:g}", extra=len(nodes))
        return
    for n in nodes:
        st.used.add(n)
    st.extra.extend(nodes)
    tried: set[tuple[int, ...]] = set()
    for perm in itertools.permutations(range(len(rest))):
        key = tuple(id(rest[i]) for i in perm)
        if key in tried:
            continue
        tried.add(key)
        yield from _match_all(pat.factors, [rest[i] for i in perm], st)
    del st.extra[len(st.extra) - len(nodes):]
    for n in nodes:
        st.used.discard(n)


def _steps(pat: Through, v: ir.Value, st: _State) -> tuple[ir.Node | None, list[ir.Value]]:
    """The producer of ``v`` and the data inputs a ``through`` may continue along (none: it stops)."""
    p = v.producer()
    if p is None or p.op_type not in pat.ops or p.domain != pat.domain or p.graph is not st.graph or p in st.used:
        return None, []
    nxt = pat.follow(p) if pat.follow is not None else (p.inputs[0] if p.inputs else None)
    if nxt is None:
        return p, []
    return p, [nxt] if isinstance(nxt, ir.Value) else [x for x in nxt if x is not None]


def _try_inner(pat: Through, chain: list[ir.Node], end: ir.Value, st: _State) -> Iterator[None]:
    st.used.update(chain)
    st.extra.extend(chain)
    prev = st.named.get(pat.name, _MISSING) if pat.name else _MISSING
    if pat.name:
        st.named[pat.name] = tuple(chain)  # type: ignore[assignment]
    yield from _match(pat.inner, end, st)
    if pat.name:
        if prev is _MISSING:
            st.named.pop(pat.name, None)
        else:
            st.named[pat.name] = prev
    del st.extra[len(st.extra) - len(chain):]
    st.used.difference_update(chain)


def _greedy(pat: Through, v: ir.Value, chain: list[ir.Node], st: _State) -> Iterator[tuple[list[ir.Node], ir.Value]]:
    """Chains from ``v`` back, longest first along each branch (post-order)."""
    if pat.max is None or len(chain) < pat.max:
        p, options = _steps(pat, v, st)
        if p is not None and p not in chain:
            for nxt in options:
                yield from _greedy(pat, nxt, [*chain, p], st)
    yield chain, v


def _exact(pat: Through, v: ir.Value, chain: list[ir.Node], depth: int, st: _State
           ) -> Iterator[tuple[list[ir.Node], ir.Value]]:
    """Chains of exactly ``depth`` more nodes from ``v`` back, in input order."""
    if depth == 0:
        yield chain, v
        return
    p, options = _steps(pat, v, st)
    if p is not None and p not in chain:
        for nxt in options:
            yield from _exact(pat, nxt, [*chain, p], depth - 1, st)


def _match_through(pat: Through, value: ir.Value, st: _State) -> Iterator[None]:
    """Greedy: the longest chain first, then shorter ones. Lazy: the shortest first, breadth-first,
    each value at the chain's end tried once (the nearest way it is reached)."""
    if not pat.lazy:
        longest = 0
        for chain, end in _greedy(pat, value, [], st):
            longest = max(longest, len(chain))
            if len(chain) >= pat.min:
                yield from _try_inner(pat, chain, end, st)
        if longest < pat.min:
            st.fail(f"expected at least {pat.min} of {pat.describe()} before {_what(value)}, found {longest}",
                    extra=longest)
        return
    tried: set[int] = set()
    depth = 0
    while pat.max is None or depth <= pat.max:
        reached = False
        for chain, end in _exact(pat, value, [], depth, st):
            reached = True
            if depth < pat.min or id(end) in tried:
                continue
            tried.add(id(end))
            yield from _try_inner(pat, chain, end, st)
        if not reached:
            if depth <= pat.min:
                st.fail(f"expected at least {pat.min} of {pat.describe()} before {_what(value)}", extra=depth)
            return
        depth += 1


class Failure:
    """Why a :class:`CompiledPattern` did not match: the reason of the attempt that got furthest."""

    __slots__ = ("reason", "score")

    def __init__(self, reason: str, score: float) -> None:
        self.reason = reason
        self.score = score  # in [0, 1): how much of the pattern matched

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Failure({self.reason!r}, score={self.score:.2f})"


class CompiledPattern:
    """A pattern function matched on given values, outside a rule (no rewrite, no interior-use check).

    For semantic fusions whose syntactic part is a pattern: ``CompiledPattern(fn).match(value)``
    gives a :class:`Match` (the first in backtracking order) or a falsy :class:`Failure`.
    """

    def __init__(self, fn: Any, name: str = "") -> None:
        self.name = name or getattr(fn, "__name__", "pattern")
        self.outputs = build_pattern(fn)
        self.variables: set[str] = set()
        for o in self.outputs:
            _variables(o, self.variables, set())
        self._size = max(_size(self.outputs[0], set()), 1)
        self._opsets: dict[str, int] = {}

    def match(self, *values: ir.Value | None) -> Match | Failure:
        """The first match of the pattern's outputs against ``values`` (one per output), or why none."""
        failure: list[Failure] = []
        return next(self.matches(*values, failure=failure), None) or failure[0]

    def matches(self, *values: ir.Value | None, failure: list[Failure] | None = None) -> Iterator[Match]:
        """Every match in backtracking order (each a snapshot); when exhausted, ``failure`` gets why
        the last attempt that got furthest stopped."""
        if len(values) != len(self.outputs):
            raise TypeError(f"pattern {self.name!r} has {len(self.outputs)} outputs, given {len(values)} values")
        first = next((v for v in values if v is not None), None)
        st = _State(first.graph if first is not None else None)
        root = first.producer() if first is not None else None
        for _ in _match_all(self.outputs, values, st):
            yield Match(root, _dedup([*st.nodes.values(), *st.extra]), dict(st.values), dict(st.attrs),
                        dict(st.named), self)
        if failure is not None:
            depth, reason = st.best
            failure.append(Failure(reason or "does not match", min(depth / self._size, 0.99)))


def _dedup(nodes: list[ir.Node]) -> list[ir.Node]:
    return list(dict.fromkeys(nodes))


def _variables(pat: Pattern | None, out: set[str], seen: set[int]) -> None:
    if pat is None or id(pat) in seen:
        return
    seen.add(id(pat))
    if isinstance(pat, Var):
        out.add(pat.name)
    elif isinstance(pat, Const) and pat.name:
        out.add(pat.name)
    elif isinstance(pat, Alternatives):
        for o in pat.options:
            _variables(o, out, seen)
    elif isinstance(pat, Product):
        for f in pat.factors:
            _variables(f, out, seen)
    elif isinstance(pat, Through):
        _variables(pat.inner, out, seen)
    elif isinstance(pat, NodeOutput):
        for key, want in pat.node.attrs.items():
            if isinstance(want, capture):
                out.add(want.name)
        for i in pat.node.inputs:
            _variables(i, out, seen)


def _root_ops(pat: Pattern | None) -> set[tuple[str, str]]:
    if isinstance(pat, Alternatives):
        return set().union(*(_root_ops(o) for o in pat.options))
    if isinstance(pat, NodeOutput):
        return {(pat.node.domain, op) for op in (pat.node.op_types or (pat.node.op_type,))}
    if isinstance(pat, Product):
        return {("", "Mul"), ("", "Div")}
    raise TypeError("a pattern must return a node's output (or alternatives of them), not a variable or constant")


def _size(pat: Pattern | None, seen: set[int]) -> int:
    """Fewest nodes any alternative of ``pat`` matches (for judging how near a failed match came)."""
    if pat is None or id(pat) in seen:
        return 0
    if isinstance(pat, Alternatives):
        return min(_size(o, set(seen)) for o in pat.options)
    if isinstance(pat, Product):
        return 1 + sum(_size(f, seen) for f in pat.factors)
    if isinstance(pat, Through):
        return pat.min + _size(pat.inner, seen)
    if isinstance(pat, NodeOutput):
        if id(pat.node) in seen:
            return 0
        seen.add(id(pat.node))
        return 1 + sum(_size(i, seen) for i in pat.node.inputs)
    return 0
