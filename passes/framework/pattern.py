"""The pattern language: a fusion is two plain functions over an op builder.

::

    def silu(op, x):
        return op.Mul(x, op.Sigmoid(x))              # Mul is commutative: both orders match

    def silu_fused(op, x):
        return op.QuickGelu(x, alpha=1.0, _domain="com.microsoft")

    rule = PatternRule("silu", silu, silu_fused, requires={"com.microsoft": ["QuickGelu"]})

A pattern function receives a builder ``op`` and one variable per further parameter. ``op.X(...)``
matches a node of type ``X`` (``_domain=`` for other domains, keyword arguments constrain
attributes); a Python number is a constant within a relative tolerance. Variables bind to values:
a variable used twice must be the same value. The language also has

* alternatives: ``op.Pow(x, 3) | op.Mul(x, op.Mul(x, x))``, tried in order;
* optional nodes: ``op.Add(h, bias) | h`` — variables of an alternative not taken are ``None``;
* constant predicates: ``op.const(math.sqrt(2), rtol=1e-4)``, ``op.const(name="bias", ndim=1)``;
* products by algebra: ``op.product(x, 0.5, t)`` matches any tree of ``Mul`` (and ``Div`` by a
  constant) with these factors in any order and association, constants multiplied together;
* attribute predicates and captures: ``axis=-1``, ``keepdims=absent_or(1)``,
  ``approximate=capture("approx")``, ``to=lambda v: v in (1, 10)``;
* named nodes, for a ``check`` that needs them: ``op.ReduceMean(x, _name="mean")``.

The replacement is a function over a builder of the same shape; its parameters receive the bound
values by name (and ``match`` the whole :class:`Match` when asked for). Returning a bound value
(``return x``) removes the pattern.

Matching never mutates the IR. Interior values (everything but the root's outputs) must be read
only inside the match. A failed match keeps the reason from the attempt that got furthest, so
``--explain`` reports near misses of every pattern rule. A rewrite is all-or-nothing: the
replacement runs against a recorder, and only when it returns are its nodes inserted, the uses
rewired, the matched nodes erased and the opsets imported.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import ir

from .base import PassContext
from .match import const_array
from .rewriter import Rewriter
from .rules import NoMatch, Rule

__all__ = [
    "PatternRule", "Match", "Pattern", "absent_or", "capture", "COMMUTATIVE", "DEFAULT_RTOL",
]

#: Binary ops whose two operands match in either order.
COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "Sum", "Mean", "Equal", "And", "Or", "Xor", "BitwiseAnd",
                         "BitwiseOr", "BitwiseXor"})
#: Tolerance of a number written in a pattern: exporters write float32 constants and hand-written
#: models round them (1.4142, 0.7071).
DEFAULT_RTOL = 1e-4

_MISSING = object()


# ----------------------------------------------------------------------------------------- #
# Pattern terms
# ----------------------------------------------------------------------------------------- #


class Pattern:
    """A pattern for one value. ``a | b`` is an alternative."""

    __slots__ = ()

    def __or__(self, other: Any) -> Pattern:
        return Alternatives((self, _term(other)))

    def __ror__(self, other: Any) -> Pattern:
        return Alternatives((_term(other), self))


@dataclass(frozen=True, eq=False)
class Var(Pattern):
    """A named value; every occurrence must bind the same IR value."""

    name: str


@dataclass(frozen=True, eq=False)
class Const(Pattern):
    """A constant (initializer or ``Constant`` node), optionally close to ``value``."""

    value: Any = None
    rtol: float = DEFAULT_RTOL
    atol: float = 0.0
    name: str | None = None
    ndim: int | None = None
    predicate: Callable[[np.ndarray], bool] | None = None

    def describe(self) -> str:
        if self.value is not None:
            return f"a constant ≈ {self.value:g}" if np.ndim(self.value) == 0 else "a constant like the pattern's"
        return f"a {self.ndim}-D constant" if self.ndim is not None else "a constant"


@dataclass(frozen=True, eq=False)
class Alternatives(Pattern):
    """The first of ``options`` that matches (backtracking into the next when a later part fails)."""

    options: tuple[Pattern | None, ...]

    def __or__(self, other: Any) -> Pattern:
        return Alternatives((*self.options, _term(other)))


@dataclass(frozen=True, eq=False)
class NodeOutput(Pattern):
    """Output ``index`` of a node pattern."""

    node: NodePattern
    index: int = 0


@dataclass(frozen=True, eq=False)
class Product(Pattern):
    """A product of ``factors`` (times ``scale``) in any order and association of Mul/Div nodes."""

    factors: tuple[Pattern, ...]
    scale: float = 1.0
    rtol: float = DEFAULT_RTOL


@dataclass(frozen=True, eq=False)
class NodePattern:
    """One node: op type, domain, input patterns, attribute constraints, outputs, optional name."""

    op_type: str
    domain: str
    inputs: tuple[Pattern | None, ...]
    attrs: Mapping[str, Any]
    num_outputs: int = 1
    name: str | None = None


@dataclass(frozen=True)
class capture:  # noqa: N801 - reads as a keyword in patterns: approximate=capture("approx")
    """An attribute constraint that binds the attribute's value (``None`` when absent) to ``name``."""

    name: str


def absent_or(value: Any) -> Callable[[Any], bool]:
    """An attribute predicate: the attribute equals ``value`` or is absent (its default is ``value``)."""
    want = _norm_attr(value)
    return lambda v: v is None or _norm_attr(v) == want


def _norm_attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (list, tuple)):
        return tuple(_norm_attr(x) for x in v)
    return v


def _attr_equal(got: Any, want: Any) -> bool:
    """Attribute equality; floats as ONNX stores them (float32), so ``alpha=1/6`` matches ``0.16666667``."""
    got, want = _norm_attr(got), _norm_attr(want)
    if isinstance(want, tuple) and isinstance(got, tuple):
        return len(got) == len(want) and all(_attr_equal(g, w) for g, w in zip(got, want))
    if isinstance(want, float) or isinstance(got, float):
        try:
            return bool(np.float32(got) == np.float32(want))
        except (TypeError, ValueError):
            return False
    return got == want


def _term(x: Any) -> Pattern | None:
    if x is None or isinstance(x, Pattern):
        return x
    if isinstance(x, (int, float, np.number)) and not isinstance(x, bool):
        return Const(float(x))
    if isinstance(x, (list, tuple, np.ndarray)):
        return Const(np.asarray(x))
    raise TypeError(f"pattern input must be a pattern value, a number or None, not {type(x).__name__}")


class PatternBuilder:
    """The ``op`` of a pattern function: ``op.Mul(a, b)``, ``op.const(...)``, ``op.product(...)``."""

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: Any, _domain: str = "", _outputs: int = 1, _name: str | None = None, **attrs: Any) -> Any:
            node = NodePattern(op_type, _norm_domain(_domain), tuple(_term(i) for i in inputs), attrs, _outputs, _name)
            outs = tuple(NodeOutput(node, i) for i in range(_outputs))
            return outs[0] if _outputs == 1 else outs

        return make

    @staticmethod
    def const(value: Any = None, *, rtol: float = DEFAULT_RTOL, atol: float = 0.0, name: str | None = None,
              ndim: int | None = None, predicate: Callable[[np.ndarray], bool] | None = None) -> Const:
        """A constant: close to ``value`` when given, of rank ``ndim``, satisfying ``predicate``; bound to ``name``."""
        return Const(None if value is None else np.asarray(value, dtype=np.float64) if np.ndim(value) else float(value),
                     rtol, atol, name, ndim, predicate)

    @staticmethod
    def product(*factors: Any, rtol: float = DEFAULT_RTOL) -> Pattern:
        """Factors multiplied in any order and association; numbers among them multiply together."""
        scale = 1.0
        terms: list[Pattern] = []
        for f in factors:
            t = _term(f)
            if isinstance(t, Const) and t.value is not None and np.ndim(t.value) == 0 and t.name is None:
                scale *= float(t.value)
            elif isinstance(t, Product):
                scale *= t.scale
                terms.extend(t.factors)
            elif t is None:
                raise TypeError("product() of None")
            else:
                terms.append(t)
        # A factor that is an alternative of products distributes: product(k, x³ | x*x*x).
        for i, t in enumerate(terms):
            if isinstance(t, Alternatives) and any(isinstance(o, Product) for o in t.options):
                rest = terms[:i] + terms[i + 1:]
                return Alternatives(tuple(PatternBuilder.product(scale, *rest, o, rtol=rtol) for o in t.options))
        return Product(tuple(terms), scale, rtol)


def _norm_domain(domain: str) -> str:
    # The IR spells the default domain ""; a user may write "ai.onnx" in a pattern.
    return "" if domain == "ai.onnx" else domain


# ----------------------------------------------------------------------------------------- #
# Matching
# ----------------------------------------------------------------------------------------- #


class Match:
    """A successful match: the root, the matched nodes and what the variables bound to.

    Bound values read as attributes (``m.x``) or items (``m["x"]``); a variable of an alternative
    that was not taken reads ``None``. ``m.node("mean")`` is the node matched by ``_name="mean"``.
    """

    __slots__ = ("root", "nodes", "values", "attrs", "named", "rule")

    def __init__(self, root: ir.Node, nodes: list[ir.Node], values: dict[str, Any], attrs: dict[str, Any],
                 named: dict[str, ir.Node], rule: PatternRule) -> None:
        self.root = root
        self.nodes = nodes
        self.values = values
        self.attrs = attrs
        self.named = named
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

    def const(self, name: str) -> np.ndarray | None:
        """The constant data bound to ``name``, or ``None``."""
        return const_array(self[name])

    def opset(self, domain: str = "") -> int:
        """The model's imported opset version of ``domain`` (0 when not imported)."""
        return self.rule._opsets.get(_norm_domain(domain), 0)


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
    if node is None or node.op_type != np_.op_type or node.domain != np_.domain:
        want = np_.op_type if not np_.domain else f"{np_.domain}::{np_.op_type}"
        st.fail(f"expected {want}, got {_what(value)}")
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
    if len(node.inputs) < len(np_.inputs) or (len(node.inputs) > len(np_.inputs)
                                              and any(v is not None for v in node.inputs[len(np_.inputs):])):
        st.fail(f"{node.label()} has {len(node.inputs)} inputs, the pattern {len(np_.inputs)}")
    else:
        st.nodes[id(np_)] = node
        st.used.add(node)
        if np_.name:
            st.named[np_.name] = node
        inputs = node.inputs[: len(np_.inputs)]
        orders = [inputs]
        if np_.op_type in COMMUTATIVE and len(inputs) == 2 and inputs[0] is not inputs[1]:
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
        interior = is_root or (len(v.uses()) == 1 and not v.is_graph_output())
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
        return {(pat.node.domain, pat.node.op_type)}
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
    if isinstance(pat, NodeOutput):
        if id(pat.node) in seen:
            return 0
        seen.add(id(pat.node))
        return 1 + sum(_size(i, seen) for i in pat.node.inputs)
    return 0


# ----------------------------------------------------------------------------------------- #
# Replacement
# ----------------------------------------------------------------------------------------- #


@dataclass
class _Planned:
    op_type: str
    domain: str
    inputs: list[ir.Value | None]
    attrs: dict[str, Any]
    outputs: list[ir.Value]


@dataclass
class ReplacementBuilder:
    """The ``op`` of a replacement function: records nodes and constants, inserted only on commit."""

    like: ir.Value | None = None
    planned: list[_Planned] = field(default_factory=list)
    constants: list[ir.Value] = field(default_factory=list)

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: Any, _domain: str = "", _outputs: int = 1, **attrs: Any) -> Any:
            values = [self._value(i) for i in inputs]
            outs = [ir.Value(op_type) for _ in range(_outputs)]
            self.planned.append(_Planned(op_type, _norm_domain(_domain), values, dict(attrs), outs))
            return outs[0] if _outputs == 1 else tuple(outs)

        return make

    def const(self, array: Any, dtype: Any = None) -> ir.Value:
        """A new initializer holding ``array`` (dtype defaults to the matched root output's float type)."""
        arr = np.asarray(array)
        if dtype is None and arr.dtype.kind == "f":
            dt = self.like.dtype if self.like is not None else None
            dtype = dt.numpy() if dt is not None and np.dtype(dt.numpy()).kind == "f" else np.float32
        if dtype is not None:
            arr = arr.astype(dtype)
        t = ir.Tensor(arr)
        v = ir.Value("const", ir.TensorType(t.dtype, t.shape), const_value=t)
        self.constants.append(v)
        return v

    def _value(self, x: Any) -> ir.Value | None:
        if x is None or isinstance(x, ir.Value):
            return x
        if isinstance(x, (int, float, np.number, list, tuple, np.ndarray)) and not isinstance(x, bool):
            return self.const(x)
        raise TypeError(f"replacement input must be a value, a number or None, not {type(x).__name__}")


# ----------------------------------------------------------------------------------------- #
# The rule
# ----------------------------------------------------------------------------------------- #

CheckFn = Callable[[Match, PassContext], Any]


class PatternRule(Rule):
    """A rewrite rule given as a pattern function and a replacement function.

    Args:
        name: the rule's name (``--explain`` lines, default report counter ``applied <name>``).
        pattern: ``pattern(op, *variables) -> value``; a list of such functions are alternatives.
        replacement: ``replacement(op, **bindings) -> value`` (a tuple for multi-output patterns).
        check: ``check(match, ctx)`` for conditions that need shapes or data: return ``True`` to
            accept, or ``False`` / a reason string to refuse (a near miss under ``--explain``), or
            a :class:`NoMatch` to choose whether it is near. A refused match backtracks into the
            pattern's next alternative.
        requires: ``{domain: [op, ...]}`` the target must provide, e.g.
            ``{"com.microsoft": ["QuickGelu"]}``; ``{"": {"Gelu": 20}}`` asks for a minimum opset
            of the default domain instead.
        stat: the report counter (``"fused Gelu"``).
    """

    def __init__(
        self,
        name: str,
        pattern: Callable[..., Any] | Sequence[Callable[..., Any]],
        replacement: Callable[..., Any],
        *,
        check: CheckFn | None = None,
        requires: Mapping[str, Any] | None = None,
        stat: str = "",
    ) -> None:
        self.name = name  # type: ignore[misc]
        self.stat = stat or f"applied {name}"  # type: ignore[misc]
        self.replacement = replacement
        self.check_fn = check
        self.requires = dict(requires or {})
        fns = [pattern] if callable(pattern) else list(pattern)
        #: The pattern functions, for introspection (docs, line counts, generators).
        self.patterns: tuple[Callable[..., Any], ...] = tuple(fns)
        outs = [_build(fn) for fn in fns]
        if len(outs) == 1:
            self.outputs: tuple[Pattern, ...] = outs[0]
        elif all(len(o) == 1 for o in outs):
            self.outputs = (Alternatives(tuple(o[0] for o in outs)),)
        else:
            raise TypeError(f"rule {name!r}: alternative pattern functions must each return one value")
        self.variables: set[str] = set()
        for o in self.outputs:
            _variables(o, self.variables, set())
        ops = _root_ops(self.outputs[0])
        domains = {d for d, _ in ops}
        self.root_domain = domains.pop() if len(domains) == 1 else ""  # type: ignore[misc]
        self.roots = tuple(sorted(op for _, op in ops))  # type: ignore[misc]
        self._size = _size(self.outputs[0], set())
        params = list(inspect.signature(replacement).parameters.values())[1:]
        self._wants = [p.name for p in params]
        unknown = [p.name for p in params if p.name not in self.variables and p.name not in ("match", "ctx")
                   and p.default is inspect.Parameter.empty]
        if unknown:
            raise TypeError(f"rule {name!r}: the replacement asks for {unknown}, which the pattern does not bind "
                            f"(it binds {sorted(self.variables)}; give a default to take None)")
        self._opsets: dict[str, int] = {}
        self._model: ir.Model | None = None

    def __repr__(self) -> str:
        return f"PatternRule({self.name!r}, roots={self.roots})"

    def prepare(self, model: ir.Model) -> PatternRule:
        """A copy of this rule bound to the model it runs on (opset imports, for ``requires`` and commit)."""
        bound = copy.copy(self)
        bound._model = model
        bound._opsets = dict(model.opset_imports)
        return bound

    # -- matching ---------------------------------------------------------------------------
    def match(self, node: ir.Node, ctx: PassContext | None = None) -> Match | NoMatch:
        """Match the pattern rooted at ``node`` (never mutates the IR)."""
        ctx = ctx or PassContext()
        st = _State(node.graph)
        refused: NoMatch | None = None
        for _ in _match_all(self.outputs, self._root_values(node), st):
            matched = [*st.nodes.values(), *st.extra]
            leak = self._interior_leak(node, matched)
            if leak:
                st.fail(leak)
                continue
            m = Match(node, _dedup(matched), dict(st.values), dict(st.attrs), dict(st.named), self)
            refused = self._accept(m, ctx)
            if refused is None:
                return m
        if refused is not None:
            return refused
        depth, reason = st.best
        near = depth >= max(2, (self._size + 1) // 2)
        return NoMatch(reason or "does not match", near=near, score=min(depth / max(self._size, 1), 0.99))

    def _root_values(self, node: ir.Node) -> list[ir.Value | None]:
        vals: list[ir.Value | None] = []
        for p in self.outputs:
            idx = p.index if isinstance(p, NodeOutput) else 0
            vals.append(node.outputs[idx] if idx < len(node.outputs) else None)
        return vals

    def _interior_leak(self, root: ir.Node, matched: list[ir.Node]) -> str:
        members = set(matched)
        returned = {id(v) for v in self._root_values(root) if v is not None}
        for n in matched:
            for o in n.outputs:
                if o is None or (n is root and id(o) in returned):
                    continue
                outside = next((u for u, _ in o.uses() if u not in members), None)
                if outside is not None:
                    return f"%{o.name} of {n.label()} is also read by {outside.label()}"
                if o.is_graph_output() or o.is_returned_by_subgraph():
                    return f"%{o.name} of {n.label()} is also an output"
        return ""

    def _accept(self, m: Match, ctx: PassContext) -> NoMatch | None:
        """``None`` when the target, the opsets and the rule's check accept ``m``, else why not."""
        for domain, ops in self.requires.items():
            d = _norm_domain(domain)
            if isinstance(ops, Mapping):  # {op: min opset}
                have = self._opsets.get(d, 0)
                for op, version in ops.items():
                    if have < version:
                        return NoMatch(f"{op} needs opset {version} of {d or 'ai.onnx'}, the model imports {have}", True)
            else:
                for op in ops:
                    if ctx.target is None or not ctx.target.supports(op, d):
                        return NoMatch(f"the target provides no {d + '::' if d else ''}{op}", True)
        verdict = True if self.check_fn is None else self.check_fn(m, ctx)
        if isinstance(verdict, NoMatch):
            return verdict
        if isinstance(verdict, str):
            return NoMatch(verdict, near=True)
        return None if verdict else NoMatch("the rule's check refused the match", near=True)

    # -- Rule protocol --------------------------------------------------------------------------
    def check(self, node: ir.Node, ctx: PassContext) -> Match | NoMatch:
        return self.match(node, ctx)

    def rewrite(self, match: Match, rw: Rewriter, ctx: PassContext) -> NoMatch | None:
        """Run the replacement against a recorder, then commit it in one step (a NoMatch: declined)."""
        root = match.root
        graph = root.graph
        assert graph is not None
        olds = [v for v in self._root_values(root)]
        builder = ReplacementBuilder(like=olds[0])
        special = {"match": match, "ctx": ctx}
        kwargs = {p: special[p] if p in special else match[p] for p in self._wants
                  if p in special or p in self.variables}
        result = self.replacement(builder, **kwargs)
        news = list(result) if isinstance(result, tuple) else [result]
        if len(news) != len(olds) or not all(isinstance(v, ir.Value) for v in news):
            raise TypeError(f"rule {self.name!r}: the replacement returned {result!r}, not {len(olds)} value(s)")
        for old, new in zip(olds, news):
            # A graph output can hand its name only to a new or internal value of its graph (see
            # Rewriter.replace_graph_output); otherwise the interface would change: decline, before
            # anything is mutated.
            if old is not None and old.is_graph_output() and not _planned(builder, new) and (
                    new.graph not in (old.graph, None) or new.is_graph_input() or new.is_initializer()
                    or new.is_graph_output()):
                return NoMatch(f"%{old.name} is a graph output and %{new.name} cannot take its name", near=True)
        _commit(builder, root, match.nodes, olds, news, rw, self._model)
        return None


def _planned(builder: ReplacementBuilder, v: ir.Value) -> bool:
    return any(v is c for c in builder.constants)


def _build(fn: Callable[..., Any]) -> tuple[Pattern, ...]:
    """Call a pattern function with a builder and one variable per parameter after ``op``."""
    params = list(inspect.signature(fn).parameters)[1:]
    out = fn(PatternBuilder(), *(Var(p) for p in params))
    outs = tuple(out) if isinstance(out, tuple) else (out,)
    if not all(isinstance(o, Pattern) for o in outs):
        raise TypeError(f"pattern {fn.__name__} must return pattern values, got {out!r}")
    return outs


def _commit(builder: ReplacementBuilder, root: ir.Node, matched: list[ir.Node], olds: list[ir.Value | None],
            news: list[ir.Value], rw: Rewriter, model: ir.Model | None) -> None:
    graph = root.graph
    assert graph is not None
    for c in builder.constants:
        assert c.const_value is not None
        real = rw.constant(graph, c.const_value, name="const")
        _retarget(builder, c, real)
    made: set[ir.Node] = set()
    for plan in builder.planned:
        node = rw.make(plan.op_type, plan.inputs, plan.attrs, domain=plan.domain, before=root,
                       num_outputs=len(plan.outputs))
        made.add(node)
        for placeholder, real in zip(plan.outputs, node.outputs):
            assert real is not None
            _retarget(builder, placeholder, real, news)
        if plan.domain and model is not None:
            rw.import_opset(model, plan.domain)
    for old, new in zip(olds, news):
        if old is None:
            continue
        if new.producer() in made and old.type is not None:
            rw.set_type(new, old.type)  # the new root output is what the old one was
        rw.replace_all_uses_with(old, new)
    rw.erase(matched)


def _retarget(builder: ReplacementBuilder, placeholder: ir.Value, real: ir.Value, news: list[ir.Value] | None = None) -> None:
    """Point the planned nodes (and the returned values) at ``real`` instead of ``placeholder``."""
    for plan in builder.planned:
        plan.inputs = [real if v is placeholder else v for v in plan.inputs]
    if news is not None:
        news[:] = [real if v is placeholder else v for v in news]


def _dedup(nodes: list[ir.Node]) -> list[ir.Node]:
    return list(dict.fromkeys(nodes))

