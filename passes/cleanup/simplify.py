"""Algebraic simplification: drop no-op nodes, merge Transpose and Reshape chains, share duplicates.

Constant-index gathers become Slices, and a Slice between two Transposes moves before them
(:mod:`passes.cleanup._indexing_rules`), so that one selection has one form whichever exporter
wrote it.

Node-local simplifications are :class:`~passes.Rule`\\ s run by :func:`~passes.apply_rules`, so
``--explain`` reports why one did not fire (``no-op-reshape at Reshape 'r': input dim 0 is
symbolic``). Each is exact: a node is removed only when it provably returns its input unchanged
(same shape and dtype; for ``x + 0`` the sign of a zero may change, as in every compiler).

Then duplicates are shared: initializers with the same dtype, shape and bytes (up to 1 MB), and
nodes with the same op, domain, attributes and inputs (common subexpressions; never for
nondeterministic ops or nodes with subgraphs).

Graph outputs keep their names: removing the node that produces one hands the name to the value
that replaces it, and when that value cannot take the name (a graph input, an initializer, another
output, or a value of an enclosing graph) the node stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

import ir

from ..framework.base import Pass, PassContext, PassResult
from ..framework.evaluator import NONDETERMINISTIC_OPS, attribute_key
from ..framework.match import const_array, producer, rank
from ..framework.pattern import Match, PatternRule
from ..framework.rules import NoMatch, Rule, apply_rules
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter
from ._indexing_rules import INDEXING_RULES

__all__ = ["SimplifyPass", "NO_OP_RULES", "TransposeMerge", "ReshapeMerge"]

#: Rounds of rules then deduplication before giving up on a fixed point.
_MAX_ROUNDS = 8
#: Initializers larger than this are not hashed for deduplication.
_DEDUP_LIMIT = 1 << 20
#: Domains whose ops are pure functions of their inputs, so equal nodes compute equal values.
_PURE_DOMAINS = frozenset({"", "ai.onnx.ml", "com.microsoft"})


def _ints_attr(node: ir.Node, name: str) -> list[int] | None | NoMatch:
    a = node.attributes.get(name)
    if a is None:
        return None
    if a.ref_attr_name:
        return NoMatch(f"attribute {name} refers to a function attribute")
    return [int(x) for x in a.value]


def _forward(op, x):
    """The replacement of every no-op: its input (a graph output keeps its name, or the rule declines)."""
    return x


def _no_op(name: str, pattern: Any, check: Any = None, stat: str = "") -> PatternRule:
    return PatternRule(name, pattern, _forward, check=check, stat=stat)


def check_dropout(m: Match, ctx: PassContext) -> Any:
    node = m.root
    if m.opset() < 7 and node.attr("is_test", 0) == 0:
        return NoMatch("opset < 7 Dropout without is_test=1 is in training mode", near=True)
    if m.mode is not None:
        mode = const_array(m.mode)
        if mode is None or mode.size != 1 or bool(mode.reshape(-1)[0]):
            return NoMatch("training_mode is not a constant false", near=True)
    return True


def check_cast(m: Match, ctx: PassContext) -> Any:
    x = m.x
    if x.dtype is None:
        return NoMatch("input dtype unknown")
    if m.root.op_type == "Cast":
        a = m.root.attributes.get("to")
        if a is None or a.ref_attr_name:
            return NoMatch("no literal 'to' attribute")
        target = a.value
    else:
        if m.like.dtype is None:
            return NoMatch("target dtype unknown")
        target = m.like.dtype
    return int(target) == int(x.dtype) or NoMatch("changes the dtype")


def _target_shape(m: Match) -> tuple[tuple[ir.Dim, ...], list[int]] | NoMatch:
    """For ``Reshape``/``Expand(x, s)``: the known shape of ``x`` and the constant ``s`` as ints."""
    if m.x.shape is None:
        return NoMatch("shape operand not constant or input rank unknown")
    return m.x.shape, [int(d) for d in m.const("shape").reshape(-1)]


def check_reshape(m: Match, ctx: PassContext) -> Any:
    known = _target_shape(m)
    if isinstance(known, NoMatch):
        return known
    shape, target = known
    if len(target) != len(shape) or target.count(-1) > 1:
        return NoMatch("changes the rank")
    a = m.root.attributes.get("allowzero")
    if a is not None and a.ref_attr_name:
        return NoMatch("allowzero refers to a function attribute")
    allowzero = m.root.attr("allowzero", 0)
    for i, (want, have) in enumerate(zip(target, shape)):
        if want == -1 or (want == 0 and not allowzero):
            continue  # -1 takes what is left (all other dims match), 0 copies the dim
        if not isinstance(have, int):
            return NoMatch(f"input dim {i} is symbolic; cannot prove it is {want}", near=True)
        if have != want:
            return NoMatch(f"dim {i}: {have} → {want}")
    return True


def check_transpose(m: Match, ctx: PassContext) -> Any:
    perm = _ints_attr(m.root, "perm")
    if isinstance(perm, NoMatch):
        return perm
    if perm is None:
        r = rank(m.x)
        return (r is not None and r <= 1) or NoMatch("default perm reverses the dims")
    return perm == list(range(len(perm))) or NoMatch("perm is not the identity")


def check_expand(m: Match, ctx: PassContext) -> Any:
    known = _target_shape(m)
    if isinstance(known, NoMatch):
        return known
    return _broadcast_keeps(*known) or NoMatch("may broadcast to a larger shape", near=True)


def _broadcast_keeps(shape: tuple[ir.Dim, ...], other: Any) -> bool:
    """True when broadcasting ``shape`` with the static ``other`` gives ``shape`` back."""
    other = tuple(other)
    if len(other) > len(shape):
        return False
    for want, have in zip(reversed(other), reversed(shape)):
        if want != 1 and want != have:
            return False
    return True


_NEUTRAL = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}


def check_neutral(m: Match, ctx: PassContext) -> Any:
    arr, x = m.const("c"), m.x
    if arr.dtype == object or arr.dtype == np.bool_ or not np.all(arr == _NEUTRAL[m.root.op_type]):
        return NoMatch("no neutral constant operand")
    if x.shape is None or x.dtype is None or ir.DataType.from_numpy(arr.dtype) != x.dtype:
        return NoMatch("the other operand's shape or dtype is unknown", near=True)
    return _broadcast_keeps(x.shape, arr.shape) or NoMatch("the constant broadcasts the result to a larger shape",
                                                           near=True)


def _neutral(op, x):
    c = op.const(name="c")
    return op.Add(x, c) | op.Sub(x, c) | op.Mul(x, c) | op.Div(x, c)  # Add and Mul: both orders


NO_OP_RULES = (
    _no_op("identity", lambda op, x: op.Identity(x), stat="removed Identity"),
    _no_op("dropout", lambda op, x, ratio, mode: op.Dropout(x) | op.Dropout(x, ratio) | op.Dropout(x, ratio, mode),
           check_dropout, "removed Dropout"),
    _no_op("no-op-cast", lambda op, x, like: op.Cast(x) | op.CastLike(x, like), check_cast, "removed no-op Cast"),
    _no_op("no-op-reshape", lambda op, x: op.Reshape(x, op.const(name="shape")), check_reshape, "removed no-op Reshape"),
    _no_op("no-op-transpose", lambda op, x: op.Transpose(x), check_transpose, "removed no-op Transpose"),
    _no_op("no-op-expand", lambda op, x: op.Expand(x, op.const(name="shape")), check_expand, "removed no-op Expand"),
    _no_op("neutral-element", _neutral, check_neutral, "removed neutral arithmetic"),
)


@dataclass(frozen=True)
class _Merge:
    node: ir.Node
    inner: ir.Node
    perm: list[int] | None = None


class TransposeMerge(Rule):
    """``Transpose(Transpose(x, p1), p2)`` → ``Transpose(x, p1∘p2)``, or ``x`` when that is the identity."""

    name = "transpose-merge"
    roots = ("Transpose",)
    stat = "merged Transposes"

    def check(self, node: ir.Node, ctx: PassContext) -> Any:
        inner = producer(node.inputs[0], "Transpose")
        if inner is None:
            return NoMatch("input is not a Transpose")
        x = inner.inputs[0]
        p1, p2 = _ints_attr(inner, "perm"), _ints_attr(node, "perm")
        for p in (p1, p2):
            if isinstance(p, NoMatch):
                return p
        r = rank(x)
        if p1 is None or p2 is None:
            if r is None:
                return NoMatch("default perm and unknown rank", near=True)
        p1 = p1 if p1 is not None else list(reversed(range(r)))  # type: ignore[arg-type]
        p2 = p2 if p2 is not None else list(reversed(range(r)))  # type: ignore[arg-type]
        if len(p1) != len(p2):
            return NoMatch("perms of different ranks")
        composed = [p1[i] for i in p2]
        if composed == list(range(len(composed))):
            out = node.outputs[0]
            if out is not None and out.is_graph_output() and (x is None or x.producer() is None or x.graph is not out.graph
                                                              or x.is_graph_output()):
                return NoMatch(f"%{out.name} is a graph output and %{x.name if x else '?'} cannot take its name",
                               near=True)
            return _Merge(node, inner, None)
        return _Merge(node, inner, composed)

    def rewrite(self, match: _Merge, rw: Rewriter, ctx: PassContext) -> None:
        node, inner = match.node, match.inner
        if match.perm is None:
            rw.replace_all_uses_with(node.outputs[0], inner.inputs[0])
            rw.erase(node)
        else:
            rw.replace_input(node, 0, inner.inputs[0])
            rw.set_attr(node, "perm", match.perm)
        rw.erase_unused([inner])


class ReshapeMerge(Rule):
    """``Reshape(Reshape(x, s1), s2)`` → ``Reshape(x, s2)`` when ``s2`` does not copy dims (no 0)."""

    name = "reshape-merge"
    roots = ("Reshape",)
    stat = "merged Reshapes"

    def check(self, node: ir.Node, ctx: PassContext) -> Any:
        inner = producer(node.inputs[0], "Reshape")
        if inner is None:
            return NoMatch("input is not a Reshape")
        s2 = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if s2 is None:
            return NoMatch("outer shape is not constant", near=True)
        if not node.attr("allowzero", 0) and np.any(s2 == 0):  # a function's ref reads as 0: safe side
            # A 0 copies a dim of the inner result, which x does not have in the same place.
            return NoMatch("outer shape copies dims (0) of the inner result", near=True)
        return _Merge(node, inner)

    def rewrite(self, match: _Merge, rw: Rewriter, ctx: PassContext) -> None:
        rw.replace_input(match.node, 0, match.inner.inputs[0])
        rw.erase_unused([match.inner])


@register_pass
@dataclass(frozen=True)
class SimplifyPass(Pass):
    """Remove no-op nodes, merge Transpose/Reshape chains, and share duplicate constants and nodes.

    Attributes:
        dedup_constants: share initializers with equal dtype, shape and bytes.
        cse: share nodes with equal op, attributes and inputs.
    """

    name: ClassVar[str] = "simplify"
    summary: ClassVar[str] = ("remove no-ops, merge Transpose/Reshape chains, constant gathers to Slices, "
                               "deduplicate constants and nodes")

    dedup_constants: bool = True
    cse: bool = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Apply the rules and the deduplications until none changes the model."""
        rw = Rewriter()
        rules: list[Rule] = [*NO_OP_RULES, TransposeMerge(), ReshapeMerge(), *INDEXING_RULES]
        for _ in range(_MAX_ROUNDS):
            # The rules run to their own fixed point; sharing duplicates can enable them again.
            apply_rules(model, rules, ctx, rw, pass_name=self.name)
            shared = 0
            for graph in list(model.graph.all_graphs()):
                if self.dedup_constants:
                    shared += _dedup_initializers(graph, rw)
                if self.cse:
                    shared += _eliminate_common_subexpressions(graph, rw)
            if not shared:
                break
        return rw.result()


def _dedup_initializers(graph: ir.Graph, rw: Rewriter) -> int:
    """Point readers of duplicate initializers at the first equal one and drop the duplicates.

    Tensors are grouped by type, shape and their first and last bytes, and compared in full only
    within a group: a model's weights differ there, so they are neither hashed nor copied.
    """
    seen: dict[tuple[Any, ...], list[ir.Value]] = {}  # group -> its first tensors of distinct data
    shared = 0
    for name, v in list(graph.initializers.items()):
        t = v.const_value
        if t is None or v.is_graph_input() or t.dtype == ir.DataType.STRING or t.nbytes > _DEDUP_LIMIT:
            continue
        raw = _bytes_view(t)
        group = seen.setdefault((int(t.dtype), t.shape, raw[:_EDGE].tobytes(), raw[-_EDGE:].tobytes()), [])
        first = next((u for u in group if np.array_equal(_bytes_view(u.const_value), raw)), None)
        if first is None:
            group.append(v)
            continue
        if not v.has_uses() or v.is_graph_output():
            continue  # unread ones are dead-flow's; a graph output keeps its name
        rw.replace_all_uses_with(v, first)
        rw.remove_initializer(graph, name)
        rw.count("shared initializers")
        shared += 1
    return shared


#: Bytes at each end of a tensor that group deduplication candidates.
_EDGE = 32


def _bytes_view(t: ir.Tensor) -> np.ndarray:
    return np.frombuffer(t.raw_bytes(), dtype=np.uint8)


def _cse_key(node: ir.Node) -> tuple[Any, ...] | None:
    domain = node.domain
    if domain not in _PURE_DOMAINS or node.op_type in NONDETERMINISTIC_OPS or node.subgraphs():
        return None
    if not any(o is not None for o in node.outputs):
        return None
    attrs = tuple(sorted(attribute_key(a) for a in node.attributes.values()))
    ins = tuple(None if v is None else id(v) for v in node.inputs)
    outs = tuple(o is not None for o in node.outputs)
    return (domain, node.op_type, node.overload, attrs, ins, outs)


def _eliminate_common_subexpressions(graph: ir.Graph, rw: Rewriter) -> int:
    """Replace each node equal to an earlier one by that one's outputs, in one forward sweep.

    Forward order makes chains collapse in the same sweep: once a node's outputs are replaced,
    the readers downstream read the earlier outputs and match their own twins.
    """
    table: dict[tuple[Any, ...], ir.Node] = {}
    shared = 0
    for node in graph:
        key = _cse_key(node)
        if key is None:
            continue
        first = table.get(key)
        if first is None or first.graph is not graph:
            table[key] = node
            continue
        pairs = [(o, f) for o, f in zip(node.outputs, first.outputs) if o is not None and f is not None]
        if any(o.is_graph_output() and f.is_graph_output() for o, f in pairs):
            continue  # both names are interface; sharing would lose one
        for o, f in pairs:
            rw.replace_all_uses_with(o, f)
        rw.erase(node)
        rw.count("shared nodes")
        shared += 1
    return shared
