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
only inside the match, with one exception: the value of a *named* node may be read elsewhere when
the replacement replaces it too. It then returns a dict, the root's replacement under ``"out"``::

    y, _, _, s = op.SkipLayerNormalization(x, skip, gamma, _domain="com.microsoft",
                                           _outputs=["y", None, None, "sum"])   # None: omitted
    return {"out": y, "sum": s}          # the readers of the node named "sum" read s

and ``match.read_elsewhere("sum")`` says whether it needs to (returning the root's own value,
``{"out": match.root.outputs[0], ...}``, keeps the root). The new nodes go before the root,
or, when a reader of a replaced interior value comes first, before that reader; when one of
their inputs is only defined after it there is no such point and the match is refused (a near
miss naming the value). A failed match keeps the reason from the attempt that got furthest, so
``--explain`` reports near misses of every pattern rule. A rewrite is all-or-nothing: the
replacement runs against a recorder, and only when it returns are its nodes inserted, the uses
rewired (a model output keeps its name), the matched nodes erased and the opsets imported.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import ir

from ._pattern_match import CompiledPattern, Failure, Match, _match_all, _root_ops, _size, _State, _variables
from ._pattern_terms import (
    COMMUTATIVE, DEFAULT_RTOL, Alternatives, Const, NodeOutput, NodePattern, Pattern, PatternBuilder, Product, Through,
    Var, _norm_domain, absent_or, capture,
)
from ._pattern_terms import build_pattern as _build
from .base import PassContext
from .match import only_users
from .rewriter import Rewriter
from .rules import NoMatch, Rule

__all__ = [
    "PatternRule", "Match", "OUT", "Pattern", "PatternBuilder", "ReplacementBuilder", "absent_or", "capture",
    "COMMUTATIVE", "DEFAULT_RTOL", "Var", "Const", "Alternatives", "NodeOutput", "NodePattern", "Product",
    "Through", "CompiledPattern", "Failure",
]


# ----------------------------------------------------------------------------------------- #
# Replacement
# ----------------------------------------------------------------------------------------- #

#: The key of the root's replacement when a replacement returns a dict (no node may be named so).
OUT = "out"


@dataclass
class _Planned:
    op_type: str
    domain: str
    inputs: list[ir.Value | None]
    attrs: dict[str, Any]
    outputs: list[ir.Value | None]  # None: an omitted optional output
    names: list[str | None] | None = None  # output name prefixes, when the replacement gave them


@dataclass
class ReplacementBuilder:
    """The ``op`` of a replacement function: records nodes and constants, inserted only on commit.

    ``op.X(*inputs, _domain=..., _outputs=n, **attrs)`` plans a node; ``_outputs`` is a count or
    the output names, ``None`` omitting an optional output (``["y", None, None, "sum"]``). A
    trailing ``None`` input is no input: ``op.LayerNormalization(x, g, beta)`` with ``beta=None``
    plans a two-input node.
    """

    like: ir.Value | None = None
    planned: list[_Planned] = field(default_factory=list)
    constants: list[ir.Value] = field(default_factory=list)

    def __getattr__(self, op_type: str) -> Callable[..., Any]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: Any, _domain: str = "", _outputs: int | Sequence[str | None] = 1, **attrs: Any) -> Any:
            values = [self._value(i) for i in inputs]
            while values and values[-1] is None:
                values.pop()
            names = None if isinstance(_outputs, int) else list(_outputs)
            outs = [ir.Value(op_type) for _ in range(_outputs)] if names is None else \
                [None if n is None else ir.Value(n) for n in names]
            self.planned.append(_Planned(op_type, _norm_domain(_domain), values, dict(attrs), outs, names))
            return outs[0] if len(outs) == 1 else tuple(outs)

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


@dataclass
class _Plan:
    """A replacement ready to commit: its recorded nodes, what replaces what, and where it goes."""

    builder: ReplacementBuilder
    pairs: list[tuple[ir.Value, ir.Value]]  # (old value, its replacement)
    before: ir.Node
    erase: list[ir.Node]  # the matched nodes, but a kept root


# ----------------------------------------------------------------------------------------- #
# The rule
# ----------------------------------------------------------------------------------------- #

CheckFn = Callable[[Match, PassContext], Any]


class PatternRule(Rule):
    """A rewrite rule given as a pattern function and a replacement function.

    Args:
        name: the rule's name (``--explain`` lines, default report counter ``applied <name>``).
        pattern: ``pattern(op, *variables) -> value``; a list of such functions are alternatives.
        replacement: ``replacement(op, **bindings) -> value`` (a tuple for multi-output patterns),
            or ``{"out": value, "<node name>": value, ...}`` to replace named interior values too.
        check: ``check(match, ctx)`` for conditions that need shapes or data: return ``True`` to
            accept, or ``False`` / a reason string to refuse (a near miss under ``--explain``), or
            a :class:`NoMatch` to choose whether it is near. A refused match backtracks into the
            pattern's next alternative.
        requires: ``{domain: [op, ...]}`` the target must provide, e.g.
            ``{"com.microsoft": ["QuickGelu"]}``; ``{"": {"Gelu": 20}}`` asks for a minimum opset
            of the default domain instead.
        stat: the report counter (``"fused Gelu"``).
        replaces: the named nodes whose values the replacement may replace (and so may be read
            outside the match). ``None`` (the default): any named node — when one is read
            elsewhere, the replacement is run against a recorder while matching to see whether it
            replaces it. A tuple limits that to its names; ``()`` never runs the replacement while
            matching, for a replacement that needs what ``rewrite`` prepares (shared caches).
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
        replaces: Sequence[str] | None = None,
    ) -> None:
        self.name = name  # type: ignore[misc]
        self.replaces = None if replaces is None else frozenset(replaces)
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
        #: The names of the pattern's named nodes (``_name=``).
        self.node_names: frozenset[str] = _node_names(self.outputs)
        if OUT in self.node_names:
            raise TypeError(f"rule {name!r}: {OUT!r} names the root's replacement; name the node otherwise")
        ops = _root_ops(self.outputs[0])
        domains = {d for d, _ in ops}
        self.root_domain = domains.pop() if len(domains) == 1 else ""  # type: ignore[misc]
        self.roots = tuple(sorted(op for _, op in ops))  # type: ignore[misc]
        self._size = _size(self.outputs[0], set())
        self._root_inputs = _root_input_heads(self.outputs[0])
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
        if not self._inputs_may_fit(node):
            return NoMatch(f"the inputs of {node.label()} are produced by ops the pattern does not read", near=False,
                           score=min(1 / max(self._size, 1), 0.99))
        st = _State(node.graph)
        refused: NoMatch | None = None
        for _ in _match_all(self.outputs, self._root_values(node), st):
            matched = [*st.nodes.values(), *st.extra]
            inside = _bound_inside(st.values, matched)
            if inside:
                st.fail(inside)
                continue
            leak, named_leak = self._interior_leak(node, matched, st.named)
            if leak:
                st.fail(leak)
                continue
            m = Match(node, _dedup(matched), dict(st.values), dict(st.attrs), dict(st.named), self)
            verdict = self._accept(m, ctx)
            if verdict is None and named_leak:
                # A named value read elsewhere: accepted when the replacement replaces it.
                plan = self._plan(m, ctx)
                verdict = plan if isinstance(plan, NoMatch) else None
            if verdict is None:
                return m
            refused = verdict
        if refused is not None:
            return refused
        depth, reason = st.best
        near = depth >= max(2, (self._size + 1) // 2)
        return NoMatch(reason or "does not match", near=near, score=min(depth / max(self._size, 1), 0.99))

    def _inputs_may_fit(self, node: ir.Node) -> bool:
        """A quick test before matching: ``False`` when no alternative of the root with ``node``'s op
        could match a node past the root (so matching would fail at once, and not as a near miss)."""
        if self._root_inputs is None:
            return True
        made = {(p.domain, p.op_type) for v in node.inputs if v is not None and (p := v.producer()) is not None}
        return any(op == (node.domain, node.op_type) and (not heads or heads & made) for op, heads in self._root_inputs)

    def _root_values(self, node: ir.Node) -> list[ir.Value | None]:
        vals: list[ir.Value | None] = []
        for p in self.outputs:
            idx = p.index if isinstance(p, NodeOutput) else 0
            vals.append(node.outputs[idx] if idx < len(node.outputs) else None)
        return vals

    def _interior_leak(self, root: ir.Node, matched: list[ir.Node], named: Mapping[str, ir.Node]) -> tuple[str, bool]:
        """Why an interior value may not be read where it is (``""`` when all are read inside),
        and whether the value of a named node is read elsewhere (allowed if the replacement replaces it)."""
        members = set(matched)
        names = {id(n) for k, n in named.items() if self.replaces is None or k in self.replaces}
        returned = {id(v) for v in self._root_values(root) if v is not None}
        named_leak = False
        for n in matched:
            for o in n.outputs:
                if o is None or (n is root and id(o) in returned) or only_users(o, members):
                    continue
                if id(n) in names and n is not root:
                    named_leak = True
                    continue
                outside = next((u for u, _ in o.uses() if u not in members), None)
                if outside is not None:
                    return f"%{o.name} of {n.label()} is also read by {outside.label()}", named_leak
                return f"%{o.name} of {n.label()} is also an output", named_leak
        return "", named_leak

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

    # -- the replacement ------------------------------------------------------------------------
    def _plan(self, match: Match, ctx: PassContext) -> _Plan | NoMatch:
        """Run the replacement against a recorder and decide where its nodes go (no IR mutation).

        A NoMatch (a near miss): an interior value read elsewhere is not replaced, a model output
        cannot take the name of its replacement, or no point precedes the readers of the replaced
        values with every input of the new nodes defined.
        """
        root = match.root
        olds = self._root_values(root)
        builder = ReplacementBuilder(like=olds[0])
        special = {"match": match, "ctx": ctx}
        kwargs = {p: special[p] if p in special else match[p] for p in self._wants
                  if p in special or p in self.variables}
        result = self.replacement(builder, **kwargs)
        extra: dict[str, Any] = {}
        if isinstance(result, Mapping):
            extra = dict(result)
            if OUT not in extra:
                raise TypeError(f"rule {self.name!r}: a replacement returning a dict gives the root's replacement "
                                f"under {OUT!r}")
            result = extra.pop(OUT)
        news = list(result) if isinstance(result, tuple) else [result]
        if len(news) != len(olds) or not all(isinstance(v, ir.Value) for v in news):
            raise TypeError(f"rule {self.name!r}: the replacement returned {result!r}, not {len(olds)} value(s)")
        # Returning the root's own outputs keeps the root: only the named interior values change.
        kept = {old is new for old, new in zip(olds, news) if old is not None}
        if kept == {True, False}:
            raise TypeError(f"rule {self.name!r}: the replacement keeps some of the root's outputs; keep all or none")
        pairs = [(old, new) for old, new in zip(olds, news) if old is not None and old is not new]
        for key, value in extra.items():
            pairs += self._interior_pairs(match, key, value)
        replaced = {id(old) for old, _ in pairs}
        members = set(match.nodes)
        keep_root = kept == {True}
        erased = [n for n in match.nodes if n is not root] if keep_root else match.nodes
        for plan_node in builder.planned:
            for v in plan_node.inputs:
                if v is not None and v.producer() in members:
                    raise TypeError(f"rule {self.name!r}: the replacement reads %{v.name} of {v.producer().label()}, "
                                    "which the match erases")
        for v in root.inputs if keep_root else ():
            if v is not None and v.producer() in members and id(v) not in replaced:
                raise TypeError(f"rule {self.name!r}: the kept root reads %{v.name} of {v.producer().label()}, "
                                "which the match erases: replace it too")
        for n in erased:
            for o in n.outputs:
                if o is not None and id(o) not in replaced and not only_users(o, members):
                    return NoMatch(f"%{o.name} of {n.label()} is read outside the match and the replacement "
                                   "does not replace it", near=True)
        taken: set[int] = set()
        for old, new in pairs:
            # A model output hands its name to its replacement (Rewriter.replace_graph_output): only
            # a new or internal value of its graph can take it, and only one name.
            if old.is_graph_output() and (id(new) in taken or not _can_take_name(builder, new, old)):
                return NoMatch(f"%{old.name} is a graph output and %{new.name} cannot take its name", near=True)
            if old.is_graph_output():
                taken.add(id(new))
        before = _insertion_point(root, members, builder, pairs)
        return before if isinstance(before, NoMatch) else _Plan(builder, pairs, before, erased)

    def _interior_pairs(self, match: Match, key: str, value: Any) -> list[tuple[ir.Value, ir.Value]]:
        """What the replacement's ``{key: value}`` replaces: the first output of the node named
        ``key`` (the outputs in order for a tuple; ``None`` replaces nothing)."""
        if key not in self.node_names:
            raise TypeError(f"rule {self.name!r}: the replacement replaces {key!r}, which names no node of the "
                            f"pattern (it names {sorted(self.node_names)})")
        node = match.node(key)
        if node is None or value is None:  # an alternative not taken, or nothing to replace
            return []
        if node is match.root:
            raise TypeError(f"rule {self.name!r}: {key!r} is the root; its replacement goes under {OUT!r}")
        values = list(value) if isinstance(value, tuple) else [value]
        if len(values) > len(node.outputs) or not all(v is None or isinstance(v, ir.Value) for v in values):
            raise TypeError(f"rule {self.name!r}: {key!r} is replaced by {value!r}, not by values of its outputs")
        return [(o, v) for o, v in zip(node.outputs, values) if o is not None and v is not None]

    # -- Rule protocol --------------------------------------------------------------------------
    def check(self, node: ir.Node, ctx: PassContext) -> Match | NoMatch:
        return self.match(node, ctx)

    def rewrite(self, match: Match, rw: Rewriter, ctx: PassContext) -> NoMatch | None:
        """Run the replacement against a recorder, then commit it in one step (a NoMatch: declined)."""
        plan = self._plan(match, ctx)
        if isinstance(plan, NoMatch):  # declined before anything is mutated
            return plan
        _commit(plan, rw, self._model)
        return None


def _can_take_name(builder: ReplacementBuilder, new: ir.Value, old: ir.Value) -> bool:
    # See Rewriter.replace_graph_output. A planned constant becomes an initializer, which keeps its name.
    return not any(new is c for c in builder.constants) and new.graph in (old.graph, None) and not (
        new.is_graph_input() or new.is_initializer() or new.is_graph_output())


def _insertion_point(root: ir.Node, members: set[ir.Node], builder: ReplacementBuilder,
                     pairs: list[tuple[ir.Value, ir.Value]]) -> ir.Node | NoMatch:
    """The node to insert the replacement before: the root, or the first reader outside the match of
    a replaced interior value when that comes earlier; a NoMatch when a value the new nodes read (or
    a bound value standing in for an old one) is only defined after that point."""
    graph = root.graph
    assert graph is not None
    returned = set(root.outputs)
    readers = {graph._holder(u) for old, _ in pairs if old not in returned for u, _ in old.uses() if u not in members}
    readers.discard(None)
    if not readers:  # the common case: every reader follows the root
        return root
    # Number the nodes from the root back to the first matched one (the match spans them; a reader
    # of a matched value follows its producer, so it is in this span or after the root).
    pos: dict[ir.Node, int] = {}
    node: Any = root
    left, i = len(members), 0
    while isinstance(node, ir.Node) and left:
        pos[node] = i
        left -= node in members
        node, i = node._prev, i - 1
    first = min(readers, key=lambda r: pos.get(r, 1))  # type: ignore[arg-type]
    limit = pos.get(first, 0)  # type: ignore[arg-type]
    if limit == 0:
        return root
    made = {id(o) for p in builder.planned for o in p.outputs if o is not None} | {id(c) for c in builder.constants}
    needed = [v for p in builder.planned for v in p.inputs if v is not None and id(v) not in made]
    needed += [new for _, new in pairs if id(new) not in made]
    for v in needed:
        p = v.producer()
        if p is not None and pos.get(p, limit - 1) >= limit:
            old = next(o for o, _ in pairs if o not in returned
                       and any(graph._holder(u) is first for u, _ in o.uses()))
            return NoMatch(f"no place for the replacement: %{v.name} is defined after {first.label()}, which reads "
                           f"%{old.name}", near=True)
    return first  # type: ignore[return-value]


def _heads(pat: Pattern | None) -> set[tuple[str, str]] | None:
    """The (domain, op) of the nodes that can produce a value ``pat`` matches; ``None``: any value
    (a variable, a constant, a term this does not know)."""
    if isinstance(pat, NodeOutput):
        return _node_ops(pat.node)
    if isinstance(pat, Product):
        return {("", "Mul"), ("", "Div")}
    if isinstance(pat, Through):  # a chain's first node, or (with none) what the inner term reads
        inner = _heads(pat.inner) if pat.min == 0 else set()
        return None if inner is None else inner | {(pat.domain, op) for op in pat.ops}
    if isinstance(pat, Alternatives):
        options = [_heads(o) for o in pat.options]
        return None if any(h is None for h in options) else set().union(*options)  # type: ignore[arg-type]
    return None


def _root_input_heads(pat: Pattern | None) -> list[tuple[tuple[str, str], set[tuple[str, str]]]] | None:
    """Per alternative of the root node: its (domain, op) and what may produce the inputs it reads
    through a node (empty when it reads none so); ``None`` when the root is not a plain node pattern."""
    options = pat.options if isinstance(pat, Alternatives) else (pat,)
    out = []
    for o in options:
        if not isinstance(o, NodeOutput):
            return None
        heads = [_heads(i) for i in o.node.inputs]
        reads = set().union(*(h for h in heads if h is not None))
        out.extend((op, reads) for op in _node_ops(o.node))
    return out


def _bound_inside(values: Mapping[str, Any], matched: list[ir.Node]) -> str:
    """Why a match binds a variable to a value its own nodes compute (``""`` when none does).

    ``Add(Add(x, b), skip)`` over ``v = Add(x, b); Add(v, v)`` binds ``skip`` to ``v``, which the
    rewrite erases: such a match is refused (backtracking tries the next reading)."""
    members = set(matched)
    for name, v in values.items():
        if isinstance(v, ir.Value) and v.producer() in members:
            return f"{name} would be %{v.name}, which the match itself computes"
    return ""


def _node_ops(node: NodePattern) -> set[tuple[str, str]]:
    """The (domain, op) a node pattern accepts: one, or each type of an ``op.any_of``."""
    return {(node.domain, op) for op in (node.op_types or (node.op_type,))}


def _node_names(pats: Sequence[Pattern | None]) -> frozenset[str]:
    """The names of the named nodes under ``pats`` (through any term's fields)."""
    names: set[str] = set()
    stack: list[Any] = list(pats)
    seen: set[int] = set()
    while stack:
        p = stack.pop()
        if id(p) in seen or not (isinstance(p, (Pattern, NodePattern)) or isinstance(p, (tuple, list))):
            continue
        seen.add(id(p))
        if isinstance(p, (tuple, list)):
            stack.extend(p)
            continue
        if isinstance(p, NodePattern) and p.name:
            names.add(p.name)
        if dataclasses.is_dataclass(p):
            stack.extend(getattr(p, f.name) for f in dataclasses.fields(p))
    return frozenset(names)


def _commit(plan: _Plan, rw: Rewriter, model: ir.Model | None) -> None:
    builder, graph = plan.builder, plan.before.graph
    assert graph is not None
    real: dict[int, ir.Value] = {}  # id(placeholder) -> the value made for it
    for c in builder.constants:
        assert c.const_value is not None
        real[id(c)] = rw.constant(graph, c.const_value, name="const")
    made: set[ir.Node] = set()
    for plan_node in builder.planned:
        inputs = [None if v is None else real.get(id(v), v) for v in plan_node.inputs]
        node = rw.make(plan_node.op_type, inputs, plan_node.attrs, domain=plan_node.domain, before=plan.before,
                       num_outputs=len(plan_node.outputs), output_names=plan_node.names)
        made.add(node)
        for placeholder, value in zip(plan_node.outputs, node.outputs):
            if placeholder is not None and value is not None:
                real[id(placeholder)] = value
        if plan_node.domain and model is not None:
            rw.import_opset(model, plan_node.domain)
    for old, placeholder in plan.pairs:
        new = real.get(id(placeholder), placeholder)
        if new.producer() in made and old.type is not None:
            rw.set_type(new, old.type)  # the new value is what the old one was
        rw.replace_all_uses_with(old, new)
    rw.erase(plan.erase)


def _dedup(nodes: list[ir.Node]) -> list[ir.Node]:
    return list(dict.fromkeys(nodes))
