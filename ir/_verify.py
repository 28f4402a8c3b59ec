"""The IR's invariants, checked in one place.

:func:`verify` raises :class:`VerificationError` naming the first node or value at fault.
"""

from __future__ import annotations

from collections.abc import Iterator

from ._core import Graph, Model, Node, Value
from ._errors import VerificationError

__all__ = ["verify", "QUANTIZED_OP_PARAMS"]

#: For quantized ops, the input indices that must be present: scales and zero points.
#: Keyed by ``(domain, op_type)``; the value maps an input index to what it is.
QUANTIZED_OP_PARAMS: dict[tuple[str, str], dict[int, str]] = {
    ("", "QuantizeLinear"): {1: "y_scale"},
    ("", "DequantizeLinear"): {1: "x_scale"},
    ("", "QLinearMatMul"): {1: "a_scale", 2: "a_zero_point", 4: "b_scale", 5: "b_zero_point", 6: "y_scale", 7: "y_zero_point"},
    ("", "QLinearConv"): {1: "x_scale", 2: "x_zero_point", 4: "w_scale", 5: "w_zero_point", 6: "y_scale", 7: "y_zero_point"},
    ("com.microsoft", "MatMulIntegerToFloat"): {2: "a_scale", 3: "b_scale", 4: "a_zero_point", 5: "b_zero_point"},
    ("com.microsoft", "DynamicQuantizeMatMul"): {2: "b_scale", 3: "b_zero_point"},
    ("com.microsoft", "QAttention"): {3: "input_scale", 4: "weight_scale", 6: "input_zero_point", 7: "weight_zero_point"},
    ("com.microsoft", "QGemm"): {1: "a_scale", 2: "a_zero_point", 4: "b_scale", 5: "b_zero_point"},
}


def verify(model_or_graph: Model | Graph) -> None:
    """Check every invariant of the IR.

    Uses match inputs; each value has one producer; nodes are in topological order; value names
    are unique in the model; graph outputs are defined; quantized ops carry scales and zero points.

    Raises:
        VerificationError: naming the node or value at fault.
    """
    if isinstance(model_or_graph, Model):
        _Verifier().graph(model_or_graph.graph, ())
        for f in model_or_graph.functions:
            _Verifier().graph(f.graph, ())
    else:
        _Verifier().graph(model_or_graph, ())


class _Verifier:
    def __init__(self) -> None:
        self.names: dict[str, Value] = {}

    def name(self, v: Value, where: str) -> None:
        if not v.name:
            raise VerificationError(f"{where}: a value has an empty name")
        other = self.names.get(v.name)
        if other is not None and other is not v:
            raise VerificationError(f"value name %{v.name} is used by two different values ({where})")
        self.names[v.name] = v

    def graph(self, g: Graph, outer: tuple[set[int], ...]) -> None:
        gname = g.name or "main"
        defined: set[int] = set()
        scopes = (defined, *outer)
        for v in g.inputs:
            self.name(v, f"input of graph {gname!r}")
            defined.add(id(v))
        for name, v in g.initializers.items():
            if v.name != name:
                raise VerificationError(f"initializer %{v.name} is registered under another name {name!r}")
            if v.const_value is None:
                raise VerificationError(f"initializer %{v.name} has no data")
            if v.producer() is not None:
                raise VerificationError(f"initializer %{v.name} also has producer {v.producer().label()}")
            self.name(v, f"initializer of graph {gname!r}")
            defined.add(id(v))
        for v, _ in g.extra.get("sparse_initializers", {}).values():
            defined.add(id(v))
        count = 0
        # Walk the raw linked list, not ``iter(g)``: iteration skips nodes whose ``_graph`` is wrong.
        for n in _linked(g):
            count += 1
            self.node(n, g, scopes)
            for o in n.outputs:
                if o is not None:
                    defined.add(id(o))
        if count != len(g):
            raise VerificationError(f"graph {gname!r} counts {len(g)} nodes but holds {count}")
        for v in [*g.inputs, *g.initializers.values()]:
            self.uses(v)
        for v in g.outputs:
            if not any(id(v) in s for s in scopes):
                raise VerificationError(f"graph {gname!r}: output %{v.name} is not defined")

    def uses(self, v: Value) -> None:
        for user, i in v._uses:
            if user.graph is None:
                raise VerificationError(f"value %{v.name} lists erased node {user.label()} among its uses")
            if not 0 <= i < len(user.inputs) or user.inputs[i] is not v:
                raise VerificationError(f"value %{v.name} lists use ({user.label()}, {i}) that reads another value")

    def node(self, n: Node, g: Graph, scopes: tuple[set[int], ...]) -> None:
        if n.graph is not g:
            raise VerificationError(f"node {n.label()} is linked into graph {g.name!r} but does not belong to it")
        for i, v in enumerate(n.inputs):
            if v is None:
                continue
            if (n, i) not in v._uses:
                raise VerificationError(f"node {n.label()}: input {i} (%{v.name}) does not list the node among its uses")
            if not any(id(v) in s for s in scopes):
                p = v.producer()
                if p is not None and p.graph is g:
                    raise VerificationError(
                        f"node {n.label()} reads %{v.name} before its producer {p.label()} (not in topological order)"
                    )
                raise VerificationError(f"node {n.label()}: input {i} reads %{v.name}, which is not defined in scope")
        for k, o in enumerate(n.outputs):
            if o is None:
                continue
            if o.producer() is not n or o.index() != k:
                raise VerificationError(f"node {n.label()}: output {k} (%{o.name}) names another producer")
            self.name(o, f"output of node {n.label()}")
            self.uses(o)
        params = QUANTIZED_OP_PARAMS.get((n.domain if n.domain != "ai.onnx" else "", n.op_type))
        if params:
            for i, what in params.items():
                if i >= len(n.inputs) or n.inputs[i] is None:
                    raise VerificationError(f"quantized node {n.label()} has no {what} (input {i})")
        for sub in n.subgraphs():
            if sub.parent is not n:
                raise VerificationError(f"subgraph {sub.name!r} of node {n.label()} names another parent")
            self.graph(sub, scopes)


def _linked(g: Graph) -> Iterator[Node]:
    """Every node in ``g``'s linked list, whether or not it claims to belong to ``g``."""
    anchor = g._anchor
    node = anchor._next
    while node is not anchor:
        if node._next._prev is not node:
            raise VerificationError(f"graph {g.name or 'main'!r}: node list is broken after node {node.label()}")
        yield node
        node = node._next
