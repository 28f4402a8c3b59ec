"""Constant folding: compute at compile time what does not depend on the model's inputs.

What folds:

* a standard-domain node whose inputs are all constant (initializers or ``Constant`` outputs),
  evaluated by :mod:`passes.framework.evaluator` (numpy, or onnxruntime on a one-node model);
* ``Constant`` nodes, which become initializers under the same name;
* shape facts: ``Shape``/``Size`` of a value whose shape is known, and the chains exporters build
  from them (``Shape → Gather/Slice → Unsqueeze → Concat``), element by element, so
  ``Gather(Shape(x), 2)`` folds when dim 2 is known even if dim 0 is symbolic.

Shapes come from :func:`ir.infer_shapes`, after binding the symbolic dims named in
``ctx.static_shapes`` (``{"batch": 1, "seq": 128}``) on every value that carries them. Binding is a
promise the user makes: the compiled model then only runs with those sizes. Inference runs again
after each round of folding, because a folded ``Reshape`` shape makes later shapes known.

What never folds: nondeterministic ops, Dropout in training mode, nodes with subgraphs, ops of
other domains, and results larger than ``max_size`` elements (so a weight is never duplicated,
e.g. by folding ``Transpose(W)`` next to ``W``), nodes that are already dead, and values a
subgraph returns directly (rewiring cannot reach those; the IR does not count them as uses).

A folded node takes with it what only it read (constants, and the ``Shape`` nodes of a shape
chain): its result replaces them. What was unread before the pass is left to dead-flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

import ir

from ..framework.base import Pass, PassContext, PassResult
from ..framework.evaluator import NONDETERMINISTIC_OPS, evaluate
from ..framework.match import const_array
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter

__all__ = ["FoldConstantsPass"]

#: Folding rounds (fold, infer shapes, fold again) before giving up on a fixed point.
_MAX_ROUNDS = 16
#: Ops with effects beyond their outputs or outputs that are not tensors.
_NEVER_FOLD = NONDETERMINISTIC_OPS | {
    "If", "Loop", "Scan", "SequenceMap", "SequenceConstruct", "SequenceEmpty", "SequenceInsert",
    "SequenceErase", "SplitToSequence", "Optional", "OptionalGetElement", "OptionalHasElement",
}
#: Largest integer constant tracked element by element as a shape fact.
_SHAPE_FACT_LIMIT = 64

# A shape fact: the rank (0 or 1) of an int64 value and its elements (an int when known).
_Fact = tuple[int, list[ir.Dim]]


@register_pass
@dataclass(frozen=True)
class FoldConstantsPass(Pass):
    """Replace nodes computable at compile time with initializers.

    Attributes:
        max_size: largest result, in elements, that is folded into an initializer.
        use_onnxruntime: evaluate ops numpy has no path for with onnxruntime.
    """

    name: ClassVar[str] = "fold-constants"
    summary: ClassVar[str] = "evaluate nodes with constant inputs and known shapes into initializers"

    max_size: int = 1 << 16
    use_onnxruntime: bool = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Bind static shapes, then alternate shape inference and folding until nothing folds."""
        rw = Rewriter()
        if ctx.static_shapes:
            _bind_static_shapes(model, ctx.static_shapes, rw)
        opset = model.opset("") or 1
        for _ in range(_MAX_ROUNDS):
            _infer_shapes(model, rw)
            folded = 0
            for graph in list(model.graph.all_graphs()):
                folded += self._fold_graph(graph, opset, model.ir_version, rw, ctx)
            if not folded:
                break
        return rw.result()

    # -- one graph ------------------------------------------------------------------------------
    def _fold_graph(
        self, graph: ir.Graph, opset: int, ir_version: int, rw: Rewriter, ctx: PassContext
    ) -> int:
        # Keyed by the value itself (identity hash): ids of values dropped by folding get reused.
        facts: dict[ir.Value, _Fact] = {}
        consumed: list[ir.Value] = []
        folded = 0
        for node in graph:
            if node.domain != "" or node.op_type in _NEVER_FOLD or node.subgraphs():
                continue
            if not any(o is not None and (o.has_uses() or o.is_graph_output()) for o in node.outputs):
                continue  # dead: dead-flow removes it, folding would only leave an unused initializer
            if node.op_type == "Constant":
                arr = _constant_attr(node)
                if arr is not None:
                    self._replace(graph, node, [arr], rw)
                    rw.count("Constant to initializer")
                    folded += 1
                continue
            results = self._evaluate(node, opset, ir_version, facts, ctx)
            if results is None:
                continue
            consumed += [v for v in node.inputs if v is not None]
            self._replace(graph, node, results, rw)
            rw.count(f"folded {node.op_type}")
            folded += 1
        _drop_orphans(consumed, rw)
        return folded

    def _evaluate(
        self, node: ir.Node, opset: int, ir_version: int, facts: dict[ir.Value, _Fact], ctx: PassContext
    ) -> list[np.ndarray | None] | None:
        """The node's outputs when they are computable and small enough, else ``None``."""
        present = [v for v in node.inputs if v is not None]
        # Decide constness before touching data: most nodes read a weight and an activation.
        if present and all(_is_constant(v) for v in present):
            consts = [const_array(v) if v is not None else None for v in node.inputs]
            if any(c is None and v is not None for c, v in zip(consts, node.inputs)):
                return None  # e.g. a sparse Constant: kept as it is
            if any(_static_size(o) > self.max_size for o in node.outputs if o is not None):
                return None
            results = evaluate(
                node, consts, opset=opset, ir_version=ir_version, use_onnxruntime=self.use_onnxruntime
            )
        else:
            fact = _shape_fact(node, opset, facts)
            if fact is None:
                return None
            facts[node.outputs[0]] = fact
            rank, elems = fact
            if not all(isinstance(d, int) for d in elems):
                return None
            arr = np.array(elems, dtype=np.int64)
            results = [arr.reshape(()) if rank == 0 else arr]
        if results is None:
            return None
        for o, r in zip(node.outputs, results):
            if o is None:
                continue
            if r is None or r.size > self.max_size:
                return None
            want = o.dtype
            if want is not None and want != ir.DataType.UNDEFINED and ir.DataType.from_numpy(r.dtype) != want:
                ctx.note(self.name, node, f"evaluated to {r.dtype}, but the output is typed {want.name}; not folded")
                return None
        return results

    def _replace(self, graph: ir.Graph, node: ir.Node, results: list[np.ndarray | None], rw: Rewriter) -> None:
        """Swap ``node`` for initializers that keep its output names."""
        new_values: list[ir.Value] = []
        for o, r in zip(node.outputs, results):
            if o is None or r is None or not (o.has_uses() or o.is_graph_output()):
                continue
            dtype = o.dtype if o.dtype not in (None, ir.DataType.UNDEFINED) else None
            # np.ascontiguousarray would turn a 0-d result into 1-d.
            t = ir.Tensor(np.array(r, order="C", copy=True), dtype=dtype)
            v = ir.Value(o.name, ir.TensorType(t.dtype, t.shape), const_value=t, doc_string=o.doc_string)
            v.metadata_props = dict(o.metadata_props)
            # Not yet registered, so a graph output is handed over under its own name.
            rw.replace_all_uses_with(o, v)
            new_values.append(v)
        rw.erase(node)
        for v in new_values:
            # The name is free once its producer is gone; the erase above recorded the change.
            graph.add_initializer(v)


def _drop_orphans(consumed: list[ir.Value], rw: Rewriter) -> None:
    """Remove what only folded nodes read: the constants and nodes their results replace.

    Only values that lost their last reader to folding are visited, so what was unread before
    the pass stays for dead-flow, and a second run has nothing to clean.
    """
    work = list(dict.fromkeys(consumed))
    while work:
        v = work.pop()
        if v.has_uses() or v.is_graph_output() or v.is_graph_input():
            continue
        if v.is_initializer():
            rw.remove_initializer(v.graph, v.name)
            continue
        node = v.producer()
        if node is None or node.graph is None:
            continue
        if all(o is None or not (o.has_uses() or o.is_graph_output()) for o in node.outputs):
            inputs = [x for x in node.inputs if x is not None]
            for sub in node.subgraphs():
                inputs += sub.captured_values()
            rw.erase(node)
            work += inputs


# -- shapes ---------------------------------------------------------------------------------------
def _all_values(model: ir.Model) -> list[ir.Value]:
    values: list[ir.Value] = []
    for g in model.graph.all_graphs():
        values.extend(g.inputs)
        values.extend(g.initializers.values())
        for n in g:
            values.extend(o for o in n.outputs if o is not None)
    return values


def _bind_static_shapes(model: ir.Model, bindings: dict[str, int], rw: Rewriter) -> None:
    for v in _all_values(model):
        t = v.type
        if not isinstance(t, ir.TensorType) or t.shape is None:
            continue
        if any(isinstance(d, str) and d in bindings for d in t.shape):
            shape = tuple(bindings.get(d, d) if isinstance(d, str) else d for d in t.shape)
            rw.set_type(v, ir.TensorType(t.dtype, shape, t.denotation))


def _infer_shapes(model: ir.Model, rw: Rewriter) -> None:
    """Run ONNX shape inference, recording every type it refines through ``rw``."""
    before = {id(v): (v, v.type) for v in _all_values(model)}
    ir.infer_shapes(model)
    for v, old in before.values():
        new = v.type
        if new != old:
            v.type = old
            rw.set_type(v, new)


def _is_constant(v: ir.Value) -> bool:
    """True for initializers (not overridable input defaults) and ``Constant`` outputs."""
    if v.const_value is not None and not v.is_graph_input():
        return True
    p = v.producer()
    return p is not None and p.op_type == "Constant" and p.domain == ""


def _static_size(v: ir.Value) -> int:
    """Elements of ``v`` when its shape is fully known, else 0 (unknown sizes are checked after)."""
    shape = v.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return 0
    return int(np.prod(shape, dtype=np.int64))


def _constant_attr(node: ir.Node) -> np.ndarray | None:
    """The data of a ``Constant`` node, or ``None`` for forms kept as they are (sparse, refs)."""
    if len(node.attributes) != 1:
        return None
    (key, a), = node.attributes.items()
    if a.ref_attr_name:
        return None
    if key == "value_string":
        return np.array(a.value, dtype=object)
    if key == "value_strings":
        return np.array(list(a.value), dtype=object)
    return const_array(node.outputs[0])


def _fact(v: ir.Value | None, facts: dict[ir.Value, _Fact]) -> _Fact | None:
    if v is None:
        return None
    known = facts.get(v)
    if known is not None:
        return known
    arr = const_array(v)
    if arr is not None and arr.dtype == np.int64 and arr.ndim <= 1 and arr.size <= _SHAPE_FACT_LIMIT:
        return arr.ndim, [int(x) for x in arr.reshape(-1)]
    return None


def _const_ints(v: ir.Value | None) -> list[int] | None:
    arr = const_array(v)
    if arr is None or arr.dtype not in (np.int32, np.int64):
        return None
    return [int(x) for x in arr.reshape(-1)]


def _shape_fact(node: ir.Node, opset: int, facts: dict[ir.Value, _Fact]) -> _Fact | None:
    """What is known, element by element, of a small int64 output derived from shapes."""
    op, ins = node.op_type, node.inputs
    if len(node.outputs) != 1 or node.outputs[0] is None:
        return None
    if op == "Shape":
        shape = ins[0].shape if ins and ins[0] is not None else None
        if shape is None:
            return None
        dims = [d if isinstance(d, int) else None for d in shape]
        return 1, dims[node.attr("start", 0) : node.attr("end", None)]
    if op == "Size":
        shape = ins[0].shape if ins and ins[0] is not None else None
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return 0, [int(np.prod(shape, dtype=np.int64))]
    if op == "Identity":
        return _fact(ins[0], facts)
    if op == "Cast":
        f = _fact(ins[0], facts)
        return f if f is not None and node.attr("to") == ir.DataType.INT64 else None
    if op == "Gather":
        data, idx = _fact(ins[0], facts), const_array(ins[1])
        if data is None or data[0] != 1 or idx is None or idx.ndim > 1 or node.attr("axis", 0) not in (0, -1):
            return None
        n = len(data[1])
        picks = [int(i) for i in idx.reshape(-1)]
        if any(not -n <= i < n for i in picks):
            return None
        return idx.ndim, [data[1][i] for i in picks]
    if op == "Slice":
        data = _fact(ins[0], facts)
        if data is None or data[0] != 1 or opset < 10:
            return None
        starts, ends = _const_ints(ins[1]), _const_ints(ins[2])
        axes = _const_ints(ins[3]) if len(ins) > 3 and ins[3] is not None else [0]
        steps = _const_ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1]
        if None in (starts, ends, axes, steps) or not len(starts) == len(ends) == len(axes) == len(steps) == 1:
            return None
        if axes[0] not in (0, -1) or steps[0] <= 0:
            return None
        from ..framework.evaluator import _clamped_slice

        return 1, data[1][_clamped_slice(starts[0], ends[0], steps[0], len(data[1]))]
    if op == "Concat":
        parts = [_fact(v, facts) for v in ins]
        if node.attr("axis", 0) not in (0, -1) or any(p is None or p[0] != 1 for p in parts):
            return None
        return 1, [d for p in parts for d in p[1]]  # type: ignore[index]
    if op in ("Unsqueeze", "Squeeze"):
        data = _fact(ins[0], facts)
        if data is None:
            return None
        if opset >= 13:
            axes = _const_ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None
        else:
            axes = node.attr("axes")
        if op == "Unsqueeze":
            return (1, data[1]) if data[0] == 0 and axes in ([0], [-1]) else None
        return (0, data[1]) if data[0] == 1 and len(data[1]) == 1 and axes in (None, [0], [-1]) else None
    return None
