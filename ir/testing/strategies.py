"""Hypothesis strategies that build random, well-formed, small IR models.

Use them to property-test your own pass: every generated model verifies, converts to ONNX, and
runs in onnxruntime in milliseconds (at most 30 nodes, float32 tensors of at most 8x8 per matrix).
The models hold work for optimization passes: dead nodes, duplicate constants, Cast round trips,
Identity nodes and Constant nodes.

A property test of a pass, checking the verifier, numerics and idempotence::

    import numpy as np
    import onnxruntime as ort
    from hypothesis import given, settings
    import ir
    from ir.testing import inputs_for, models

    def run(model, feeds):
        proto = ir.to_onnx(model).SerializeToString()
        sess = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)

    @settings(max_examples=50, deadline=None)
    @given(models())
    def test_my_pass_keeps_numerics(model):
        feeds = inputs_for(model, np.random.default_rng(0))
        expected = run(model, feeds)
        MyPass().run(model, ctx)
        ir.verify(model)
        for a, b in zip(expected, run(model, feeds)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

To check that a pass keeps use lists exact after arbitrary edits, draw ``mutations()`` as well,
apply them with :meth:`Mutation.apply`, and compare every value's ``uses()`` with
:func:`recompute_uses`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st

from .._core import Graph, Model, Node, Value
from .._dtypes import DataType
from .._tensor import Tensor
from .._types import TensorType

__all__ = ["graphs", "models", "inputs_for", "mutations", "Mutation", "recompute_uses"]

MAX_DIM = 8
BATCH = "batch"

_UNARY = ("Relu", "Tanh", "Sigmoid", "Neg", "Abs", "Identity")
_BINARY = ("Add", "Sub", "Mul")
_KINDS = (
    "unary", "binary", "binary_const", "exp", "matmul", "reshape", "transpose", "concat",
    "reduce_mean", "softmax", "layer_norm", "cast", "constant", "dead",
)


class _Builder:
    """Grows a graph node by node, tracking every live float32 value and its shape."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any], opset: int) -> None:
        self.draw = draw
        self.opset = opset
        self.graph = Graph(name="generated")
        self.values: list[Value] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def data(self, shape: tuple[int, ...]) -> np.ndarray:
        seed = self.draw(st.integers(0, 2**16))
        return np.random.default_rng(seed).uniform(-1.0, 1.0, size=shape).astype(np.float32)

    def const(self, array: np.ndarray, prefix: str = "w") -> Value:
        v = Value(self.name(prefix), const_value=Tensor(np.asarray(array)))
        return self.graph.add_initializer(v)

    def ints(self, values: list[int]) -> Value:
        """An int64 shape/axes operand: an initializer or a Constant node."""
        arr = np.array(values, dtype=np.int64)
        if self.draw(st.booleans()):
            return self.const(arr, "shape")
        return self.node("Constant", [], (len(values),), attrs={"value": Tensor(arr)}, dtype=DataType.INT64,
                         track=False)

    def node(
        self,
        op: str,
        inputs: list[Value | None],
        shape: tuple[int | str, ...],
        *,
        attrs: dict[str, Any] | None = None,
        dtype: DataType = DataType.FLOAT,
        track: bool = True,
    ) -> Value:
        named = self.draw(st.booleans())
        out = Value(self.name("v"), TensorType(dtype, tuple(shape)))
        n = Node(op, inputs, attrs, name=self.name("n") if named else "", outputs=[out])
        self.graph.append(n)
        if track:
            self.values.append(out)
        return out

    def pick(self, pred: Callable[[Value], bool] = lambda v: True) -> Value | None:
        cands = [v for v in self.values if pred(v)]
        if not cands:
            return None
        # Favour recent values so the graph is deep rather than wide.
        i = self.draw(st.integers(0, len(cands) - 1))
        return cands[max(i, len(cands) - 1 - i)]

    # -- one random step -------------------------------------------------------------------
    def step(self) -> None:
        kind = self.draw(st.sampled_from(_KINDS))
        getattr(self, "op_" + kind)()

    def op_unary(self) -> None:
        x = self.pick()
        op = self.draw(st.sampled_from(_UNARY))
        self.node(op, [x], x.shape)

    def op_binary(self) -> None:
        x = self.pick()
        y = self.pick(lambda v: v.shape == x.shape)
        op = self.draw(st.sampled_from(_BINARY))
        self.node(op, [x, y] if self.draw(st.booleans()) else [y, x], x.shape)

    def op_binary_const(self) -> None:
        x = self.pick()
        last = x.shape[-1]
        if isinstance(last, str):
            return self.op_unary()
        op = self.draw(st.sampled_from(_BINARY))
        self.node(op, [x, self.const(self.data((last,)))], x.shape)

    def op_exp(self) -> None:
        x = self.pick()
        lo = self.const(np.array(-3.0, np.float32), "lo")
        hi = self.const(np.array(3.0, np.float32), "hi")
        clipped = self.node("Clip", [x, lo, hi], x.shape)
        self.node("Exp", [clipped], x.shape)

    def op_matmul(self) -> None:
        x = self.pick(lambda v: isinstance(v.shape[-1], int))
        if x is None:
            return self.op_unary()
        k = x.shape[-1]
        n = self.draw(st.integers(1, MAX_DIM))
        w = self.const(self.data((k, n)))
        self.node("MatMul", [x, w], (*x.shape[:-1], n))

    def op_reshape(self) -> None:
        # Merge or split trailing static dims; 0 copies the (maybe symbolic) leading dim.
        x = self.pick(lambda v: all(isinstance(d, int) for d in v.shape[1:]))
        if x is None:
            return self.op_unary()
        rest = int(np.prod(x.shape[1:]))
        if len(x.shape) == 3 and rest <= MAX_DIM:
            target, spec = (x.shape[0], rest), [0, -1]
        else:
            splits = [a for a in range(2, MAX_DIM + 1) if rest % a == 0 and rest // a <= MAX_DIM]
            if len(x.shape) != 2 or not splits:
                return self.op_unary()
            a = self.draw(st.sampled_from(splits))
            target, spec = (x.shape[0], a, rest // a), [0, a, -1]
        self.node("Reshape", [x, self.ints(spec)], target)

    def op_transpose(self) -> None:
        x = self.pick()
        perm = self.draw(st.permutations(range(len(x.shape))))
        self.node("Transpose", [x], tuple(x.shape[p] for p in perm), attrs={"perm": list(perm)})

    def op_concat(self) -> None:
        x = self.pick(lambda v: isinstance(v.shape[-1], int) and 2 * v.shape[-1] <= MAX_DIM)
        if x is None:
            return self.op_unary()
        y = self.pick(lambda v: v.shape == x.shape)
        self.node("Concat", [x, y], (*x.shape[:-1], 2 * x.shape[-1]), attrs={"axis": -1})

    def op_reduce_mean(self) -> None:
        x = self.pick()
        shape = (*x.shape[:-1], 1)
        if self.opset >= 18:
            self.node("ReduceMean", [x, self.ints([-1])], shape, attrs={"keepdims": 1})
        else:
            self.node("ReduceMean", [x], shape, attrs={"axes": [-1], "keepdims": 1})

    def op_softmax(self) -> None:
        x = self.pick()
        self.node("Softmax", [x], x.shape, attrs={"axis": -1})

    def op_layer_norm(self) -> None:
        x = self.pick(lambda v: isinstance(v.shape[-1], int))
        if x is None:
            return self.op_unary()
        d = x.shape[-1]
        scale = self.const(self.data((d,)) + 1.5, "scale")
        bias = self.const(self.data((d,)), "bias")
        self.node("LayerNormalization", [x, scale, bias], x.shape, attrs={"axis": -1, "epsilon": 1e-5})

    def op_cast(self) -> None:
        x = self.pick()
        mid = self.draw(st.sampled_from([DataType.FLOAT16, DataType.DOUBLE]))
        y = self.node("Cast", [x], x.shape, attrs={"to": int(mid)}, dtype=mid, track=False)
        self.node("Cast", [y], x.shape, attrs={"to": int(DataType.FLOAT)})

    def op_constant(self) -> None:
        x = self.pick(lambda v: isinstance(v.shape[-1], int))
        if x is None:
            return self.op_unary()
        data = self.data((x.shape[-1],))
        c = self.node("Constant", [], data.shape, attrs={"value": Tensor(data)}, track=False)
        if self.draw(st.booleans()):
            # A duplicate of the same constant, for CSE and constant-dedup passes.
            d = self.node("Constant", [], data.shape, attrs={"value": Tensor(data.copy())}, track=False)
            y = self.node("Add", [x, c], x.shape)
            self.node("Mul", [y, d], x.shape)
        else:
            self.node("Add", [x, c], x.shape)

    def op_dead(self) -> None:
        # Work for dead-code elimination: a node nobody reads (unless it is later picked).
        x = self.pick()
        out = Value(self.name("dead"), TensorType(DataType.FLOAT, x.shape))
        self.graph.append(Node(self.draw(st.sampled_from(_UNARY)), [x], outputs=[out]))
        if self.draw(st.booleans()):
            self.const(np.zeros((2,), np.float32), "unused")


@st.composite
def graphs(
    draw: Callable[[st.SearchStrategy[Any]], Any],
    *,
    max_nodes: int = 30,
    opset: int = 18,
    symbolic_batch: bool | None = None,
) -> Graph:
    """A random well-formed graph of float32 transformer-ish ops, in topological order.

    Args:
        draw: supplied by hypothesis.
        max_nodes: upper bound on the node count (keep it small so onnxruntime stays fast).
        opset: the ONNX opset the ops are written for (17 or 18: ReduceMean's axes differ).
        symbolic_batch: give inputs a symbolic leading ``"batch"`` dim; ``None`` draws it.

    Returns:
        A graph with one or two float32 inputs and one to three outputs; intermediate values are
        sometimes untyped, as in models from exporters that omit ``value_info``.
    """
    b = _Builder(draw, opset)
    if symbolic_batch is None:
        symbolic_batch = draw(st.booleans())
    for i in range(draw(st.integers(1, 2))):
        rank = draw(st.integers(2, 3))
        dims = tuple(draw(st.integers(1, MAX_DIM)) for _ in range(rank))
        shape = (BATCH, *dims[1:]) if symbolic_batch else dims
        v = b.graph.add_input(Value(f"x{i}", TensorType(DataType.FLOAT, shape)))
        b.values.append(v)
    steps = draw(st.integers(1, max(1, max_nodes // 2)))
    for _ in range(steps):
        if len(b.graph) + 3 > max_nodes:
            break
        b.step()
    produced = [v for v in b.values if v.producer() is not None]
    if not produced:
        b.op_unary()
        produced = [b.values[-1]]
    outs = draw(st.lists(st.sampled_from(produced), min_size=1, max_size=3, unique_by=id))
    if produced[-1] not in outs:
        outs[0] = produced[-1]
    b.graph.outputs.extend(outs)
    for n in b.graph:
        for o in n.outputs:
            if o is not None and not o.is_graph_output() and draw(st.integers(0, 3)) == 0:
                o.type = None
    return b.graph


@st.composite
def models(
    draw: Callable[[st.SearchStrategy[Any]], Any],
    *,
    max_nodes: int = 30,
    opsets: tuple[int, ...] = (17, 18),
    symbolic_batch: bool | None = None,
) -> Model:
    """A random well-formed model around :func:`graphs`, importing opset 17 or 18.

    Args:
        draw: supplied by hypothesis.
        max_nodes: upper bound on the node count.
        opsets: default-domain opset versions to choose from.
        symbolic_batch: give inputs a symbolic ``"batch"`` dim; ``None`` draws it.
    """
    opset = draw(st.sampled_from(opsets))
    g = draw(graphs(max_nodes=max_nodes, opset=opset, symbolic_batch=symbolic_batch))
    return Model(g, ir_version=8 if opset <= 17 else 9, opset_imports={"": opset}, producer_name="ir.testing")


def inputs_for(model: Model | Graph, rng: np.random.Generator, *, dim: int | None = None) -> dict[str, np.ndarray]:
    """Random feeds for a model's inputs (initializers excluded).

    Symbolic dims get one size per name, so inputs that share ``"batch"`` agree.

    Args:
        model: the model or graph to feed.
        rng: source of randomness, e.g. ``np.random.default_rng(0)``.
        dim: size for symbolic and unknown dims; drawn from 1..3 when ``None``.
    """
    g = model.graph if isinstance(model, Model) else model
    sizes: dict[str | None, int] = {}
    feeds: dict[str, np.ndarray] = {}
    for v in g.inputs:
        if v.is_initializer():
            continue
        t = v.type
        if not isinstance(t, TensorType) or t.shape is None:
            raise ValueError(f"input %{v.name} has no tensor type with a shape; cannot make a feed")
        shape = []
        for d in t.shape:
            if isinstance(d, int):
                shape.append(d)
            else:
                if d not in sizes:
                    sizes[d] = dim if dim is not None else int(rng.integers(1, 4))
                shape.append(sizes[d])
        np_dtype = t.dtype.numpy()
        if t.dtype == DataType.BOOL:
            arr = rng.integers(0, 2, size=shape).astype(bool)
        elif t.dtype.is_integer:
            arr = rng.integers(0, 8, size=shape).astype(np_dtype)
        else:
            arr = rng.standard_normal(size=shape).astype(np_dtype)
        feeds[v.name] = arr
    return feeds


# -- mutations ----------------------------------------------------------------------------------
_MUTATION_KINDS = ("replace_input", "replace_all_uses_with", "insert_before", "insert_after", "erase_unused")


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One random edit, made of the IR's public mutation API.

    ``picks`` are raw random integers; :meth:`apply` reduces them modulo whatever the graph holds
    when the mutation runs, so a sequence of mutations applies to any graph. Every mutation keeps
    the graph verifiable and rewires only float32 data values to values of the same type (never
    shape operands), so the mutated model still runs.
    """

    kind: str
    picks: tuple[int, ...]

    def apply(self, graph: Graph) -> str | None:
        """Perform the edit on ``graph``; return what was done, or ``None`` when nothing applied."""
        return getattr(self, "_" + self.kind)(graph)

    def _pick(self, i: int, items: list[Any]) -> Any:
        return items[self.picks[i] % len(items)] if items else None

    @staticmethod
    def _defined_before(graph: Graph, node: Node | None) -> list[Value]:
        vals = list(graph.inputs) + list(graph.initializers.values())
        for n in graph:
            if n is node:
                break
            vals.extend(o for o in n.outputs if o is not None)
        return vals

    @classmethod
    def _same_type_before(cls, graph: Graph, node: Node, old: Value, *, exclude_self: bool) -> list[Value]:
        # Only float32 data is rewired: int64 operands of the same type (shapes, axes) differ in meaning.
        if old.dtype != DataType.FLOAT:
            return []
        return [v for v in cls._defined_before(graph, node) if v.type == old.type and not (exclude_self and v is old)]

    def _replace_input(self, graph: Graph) -> str | None:
        node = self._pick(0, [n for n in graph if any(v is not None for v in n.inputs)])
        if node is None:
            return None
        i = self._pick(1, [k for k, v in enumerate(node.inputs) if v is not None])
        old = node.inputs[i]
        new = self._pick(2, self._same_type_before(graph, node, old, exclude_self=True))
        if new is None:
            return None
        node.replace_input(i, new)
        return f"replace_input({node.label()}, {i}, %{new.name})"

    def _replace_all_uses_with(self, graph: Graph) -> str | None:
        node = self._pick(0, [n for n in graph if n.outputs and n.outputs[0] is not None])
        if node is None:
            return None
        old = node.outputs[0]
        new = self._pick(1, self._same_type_before(graph, node, old, exclude_self=False))
        if new is None:
            return None
        old.replace_all_uses_with(new)
        return f"%{old.name}.replace_all_uses_with(%{new.name})"

    def _insert(self, graph: Graph, before: bool) -> str | None:
        node = self._pick(0, [n for n in graph if any(v is not None for v in n.inputs)])
        if node is None:
            return None
        op = ("Identity", "Relu", "Neg")[self.picks[2] % 3]
        if before:
            i = self._pick(1, [k for k, v in enumerate(node.inputs) if v is not None])
            src = node.inputs[i]
            if src.dtype != DataType.FLOAT:
                op = "Identity"  # shape operands must keep their values
            out = Value(graph.unique_name("mut"), src.type)
            graph.insert_before(node, Node(op, [src], outputs=[out]))
            node.replace_input(i, out)
            return f"insert {op} before {node.label()} on input {i}"
        src = self._pick(1, [o for o in node.outputs if o is not None])
        if src is None:
            return None
        if src.dtype != DataType.FLOAT:
            op = "Identity"
        new = Node(op, [src], outputs=[Value(graph.unique_name("mut"), src.type)])
        graph.insert_after(node, new)
        for user, k in src.uses():
            if user is not new:
                user.replace_input(k, new.outputs[0])
        return f"insert {op} after {node.label()}"

    def _insert_before(self, graph: Graph) -> str | None:
        return self._insert(graph, True)

    def _insert_after(self, graph: Graph) -> str | None:
        return self._insert(graph, False)

    def _erase_unused(self, graph: Graph) -> str | None:
        dead = [
            n for n in graph
            if all(o is None or (not o.has_uses() and not o.is_graph_output()) for o in n.outputs)
        ]
        node = self._pick(0, dead)
        if node is None:
            return None
        label = node.label()
        graph.erase(node)
        return f"erase {label}"


def mutations(*, min_size: int = 1, max_size: int = 10) -> st.SearchStrategy[list[Mutation]]:
    """Sequences of random mutations (replace_input, replace_all_uses_with, insert, erase).

    Example::

        @given(models(), mutations())
        def test_my_pass_after_random_edits(model, muts):
            for m in muts:
                m.apply(model.graph)
            MyPass().run(model, ctx)
            ir.verify(model)
            expected = recompute_uses(model.graph)
            for n in model.graph:
                for o in n.outputs:
                    if o is not None:
                        assert set(o.uses()) == set(expected.get(o, []))
    """
    one = st.builds(
        Mutation,
        st.sampled_from(_MUTATION_KINDS),
        st.tuples(st.integers(0, 2**16), st.integers(0, 2**16), st.integers(0, 2**16)),
    )
    return st.lists(one, min_size=min_size, max_size=max_size)


def recompute_uses(graph: Graph) -> dict[Value, list[tuple[Node, int]]]:
    """Brute-force uses of every value read by a node of ``graph`` or its subgraphs.

    The reference for checking :meth:`Value.uses`: each value maps to the ``(node, index)`` pairs
    of every node whose input ``index`` is that value. Values nobody reads are absent. Order
    within a value's list follows node order, not the order uses were added.
    """
    uses: dict[Value, list[tuple[Node, int]]] = {}
    for n in graph.all_nodes():
        for i, v in enumerate(n.inputs):
            if v is not None:
                uses.setdefault(v, []).append((n, i))
    return uses
