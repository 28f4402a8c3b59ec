"""Pattern terms and the builder of pattern functions (see :mod:`passes.framework.pattern`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Pattern", "Var", "Const", "Alternatives", "NodeOutput", "Product", "Through", "NodePattern", "PatternBuilder",
    "capture", "absent_or", "build_pattern", "COMMUTATIVE", "DEFAULT_RTOL",
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
class Through(Pattern):
    """Zero or more nodes of ``ops`` from the use back to ``inner``, each followed along a data input.

    The data input is input 0, or what ``follow(node)`` returns: a value, a list of values (each
    tried in turn) or ``None`` (the walk cannot pass that node). Greedy matching tries the longest
    chain first, backtracking to shorter ones when the rest fails; lazy matching the shortest
    first, breadth-first.
    """

    inner: Pattern
    ops: frozenset[str]
    domain: str = ""
    follow: Callable[[Any], Any] | None = None  # (ir.Node) -> ir.Value | None
    name: str | None = None
    min: int = 0
    max: int | None = None
    lazy: bool = False

    def describe(self) -> str:
        return "/".join(sorted(self.ops))


@dataclass(frozen=True, eq=False)
class NodePattern:
    """One node: op type, domain, input patterns, attribute constraints, outputs, optional name.

    ``op_types`` (from ``op.any_of``) lets the node be any of a set of op types; its ``inputs``
    then match a prefix of the node's inputs and the rest are free.
    """

    op_type: str
    domain: str
    inputs: tuple[Pattern | None, ...]
    attrs: Mapping[str, Any]
    num_outputs: int = 1
    name: str | None = None
    op_types: frozenset[str] | None = None

    def accepts(self, op_type: str) -> bool:
        return op_type in self.op_types if self.op_types is not None else op_type == self.op_type

    def describe(self) -> str:
        what = self.op_type if self.op_types is None else "one of " + "/".join(sorted(self.op_types))
        return f"{self.domain}::{what}" if self.domain else what


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
    def through(x: Any, ops: Any, *, follow: Callable[[Any], Any] | None = None, domain: str = "", min: int = 0,
                max: int | None = None, lazy: bool = False, _name: str | None = None) -> Through:
        """Zero or more nodes whose type is in ``ops`` between the use and ``x`` (``m.chain(_name)``).

        Each node is passed along input 0, or along ``follow(node)``: return another input, a list
        of inputs to try each (a search through a tree of ops), or ``None`` to stop there (a step
        that needs a condition). ``min``/``max`` bound the number of nodes. Greedy (the longest
        chain first) unless ``lazy`` (the shortest first, breadth-first, each end value once).
        """
        inner = _term(x)
        if inner is None:
            raise TypeError("through() of None")
        names = frozenset([ops] if isinstance(ops, str) else ops) - {""}
        if not names:
            raise ValueError("through() needs at least one op type")
        return Through(inner, names, _norm_domain(domain), follow, _name, min, max, lazy)

    @staticmethod
    def any_of(ops: Any, *inputs: Any, _domain: str = "", _name: str | None = None, **attrs: Any) -> NodeOutput:
        """A node of any type in ``ops``; ``inputs`` match the first inputs, the others are free."""
        names = frozenset([ops] if isinstance(ops, str) else ops) - {""}
        if not names:
            raise ValueError("any_of() needs at least one op type")
        node = NodePattern("|".join(sorted(names)), _norm_domain(_domain), tuple(_term(i) for i in inputs), attrs,
                           1, _name, names)
        return NodeOutput(node, 0)

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


def build_pattern(fn: Callable[..., Any]) -> tuple[Pattern, ...]:
    """Call a pattern function with a builder and one variable per parameter after ``op``."""
    params = list(inspect.signature(fn).parameters)[1:]
    out = fn(PatternBuilder(), *(Var(p) for p in params))
    outs = tuple(out) if isinstance(out, tuple) else (out,)
    if not all(isinstance(o, Pattern) for o in outs):
        raise TypeError(f"pattern {getattr(fn, '__name__', fn)} must return pattern values, got {out!r}")
    return outs


def _norm_domain(domain: str) -> str:
    # The IR spells the default domain ""; a user may write "ai.onnx" in a pattern.
    return "" if domain == "ai.onnx" else domain
