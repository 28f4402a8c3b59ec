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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import ir

from ._pattern_match import Match, _match_all, _root_ops, _size, _State, _variables
from ._pattern_terms import (
    COMMUTATIVE, DEFAULT_RTOL, Alternatives, Const, NodeOutput, NodePattern, Pattern, PatternBuilder, Product, Var,
    _norm_domain, absent_or, capture,
)
from .base import PassContext
from .rewriter import Rewriter
from .rules import NoMatch, Rule

__all__ = [
    "PatternRule", "Match", "Pattern", "PatternBuilder", "ReplacementBuilder", "absent_or", "capture",
    "COMMUTATIVE", "DEFAULT_RTOL", "Var", "Const", "Alternatives", "NodeOutput", "NodePattern", "Product",
]


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
