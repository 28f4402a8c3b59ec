"""Probe models: run a piece of a graph in onnxruntime to learn what it computes.

A :class:`Probe` copies the cone of some values (every node they depend on, back to graph
inputs, initializers and *cut* values) into a small standalone model. Cut values become inputs of
the probe, so a probe of one attention layer does not run the layers before it. The original model
is never touched: the probe holds copies of the nodes and shares only the (read-only) tensors.

Used by the attention fusion to check layouts, scales and masks by evaluation instead of by
matching the exporters' many syntactic forms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

import ir

from ..framework.numerics import index_rows

__all__ = ["Probe", "ProbeError", "input_feeds", "float_dtype", "int_dtype"]


class ProbeError(Exception):
    """A probe model could not be built or run (the message says why)."""


class Probe:
    """A standalone model computing ``outputs`` from the graph inputs and ``cuts``.

    Args:
        model: the model to copy from (main graph only).
        outputs: values to compute.
        cuts: values fed by the caller instead of computed.

    Attributes:
        inputs: the original values that are inputs of the probe (graph inputs, then cuts),
            in the order :meth:`run` expects them in ``feeds``.
    """

    def __init__(self, model: ir.Model, outputs: Sequence[ir.Value], cuts: Iterable[ir.Value] = ()) -> None:
        graph = model.graph
        cut_ids = {id(v) for v in cuts}
        graph_inputs = {id(v) for v in graph.inputs}
        needed: set[int] = set()
        reached_inputs: dict[int, ir.Value] = {}
        stack = list(outputs)
        seen: set[int] = set()
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            if id(v) in cut_ids or id(v) in graph_inputs:
                reached_inputs[id(v)] = v
                continue
            node = v.producer()
            if node is None:
                if v.const_value is None:
                    raise ProbeError(f"value %{v.name} has no producer and no data")
                continue
            if node.graph is not graph:
                raise ProbeError(f"value %{v.name} is defined in a subgraph")
            if node.subgraphs():
                raise ProbeError(f"node {node.label()} holds subgraphs")
            if id(node) in needed:
                continue
            needed.add(id(node))
            stack.extend(x for x in node.inputs if x is not None)

        copies: dict[int, ir.Value] = {}

        def copy(v: ir.Value) -> ir.Value:
            c = copies.get(id(v))
            if c is None:
                c = ir.Value(v.name, v.type)
                if v.const_value is not None and id(v) not in reached_inputs and v.producer() is None:
                    c.const_value = v.const_value
                copies[id(v)] = c
            return c

        # Graph inputs first (in the model's order), then cuts.
        ordered = [v for v in graph.inputs if id(v) in reached_inputs]
        ordered += [v for v in reached_inputs.values() if id(v) not in graph_inputs]
        self.inputs: list[ir.Value] = ordered
        probe_inputs = [copy(v) for v in ordered]
        for c in probe_inputs:
            if not isinstance(c.type, ir.TensorType) or c.type.dtype == ir.DataType.UNDEFINED:
                # Cut values inside a model without shape annotations: activations are float.
                c.type = ir.TensorType(ir.DataType.FLOAT)
        nodes: list[ir.Node] = []
        initializers: list[ir.Value] = []
        for node in graph:
            if id(node) not in needed:
                continue
            ins = []
            for x in node.inputs:
                if x is None:
                    ins.append(None)
                    continue
                known = id(x) in copies
                c = copy(x)
                if not known and c.const_value is not None:
                    initializers.append(c)
                ins.append(c)
            attrs = [
                ir.Attr(a.name, a.type, a.value, ref_attr_name=a.ref_attr_name) for a in node.attributes.values()
            ]
            outs = [None if o is None else copy(o) for o in node.outputs]
            nodes.append(ir.Node(node.op_type, ins, attrs, domain=node.domain, outputs=outs, name=node.name))
        probe_outputs = []
        for v in outputs:
            c = copy(v)
            if c.const_value is not None and c not in initializers and c.producer() is None:
                initializers.append(c)
            probe_outputs.append(c)
        g = ir.Graph(probe_inputs, probe_outputs, nodes, initializers, name="probe")
        self.model = ir.Model(g, ir_version=model.ir_version, opset_imports=dict(model.opset_imports),
                              functions=list(model.functions))
        self.outputs = list(outputs)
        self._session: Any = None

    def _sess(self) -> Any:
        if self._session is None:
            from ..framework.numerics import session

            try:
                # The weights reach onnxruntime in place: copied into the protobuf and parsed back
                # out of its bytes, they were most of a probe's cost (MiniLM's Q/K/V: 10.7 MB).
                proto, shared = ir.to_onnx_sharing(self.model, _shareable)
                arrays = {name: _array_view(t) for name, t in shared.items()}
                self._session = session(proto.SerializeToString(), initializers=arrays)
            except Exception as e:  # onnxruntime refuses the piece: report, do not crash the pass
                raise ProbeError(f"onnxruntime cannot run the probe: {_first_line(e)}") from e
        return self._session

    def run(self, feeds: dict[int, np.ndarray]) -> list[np.ndarray]:
        """Run the probe; ``feeds`` maps ``id(original value)`` to an array for every input."""
        sess = self._sess()
        names = [i.name for i in sess.get_inputs()]
        by_name = {v.name: v for v in self.inputs}
        try:
            return sess.run(None, {n: feeds[id(by_name[n])] for n in names})
        except Exception as e:
            raise ProbeError(f"the probe failed in onnxruntime: {_first_line(e)}") from e


# Element types that onnxruntime takes from numpy arrays as they are (no 4-bit packing, no bfloat16).
_SHAREABLE = frozenset({
    ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BOOL,
    ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
    ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
})


def _shareable(t: ir.Tensor) -> bool:
    """Initializers handed to onnxruntime from memory: large ones (small ones cost nothing inline)."""
    return t.dtype in _SHAREABLE and t.nbytes >= 1024


def _array_view(t: ir.Tensor) -> np.ndarray:
    """``t`` as numpy, without keeping a decoded copy on a tensor that has none yet."""
    if t.is_loaded:
        return t.numpy()
    dtype = np.dtype(t.dtype.numpy()).newbyteorder("<")
    return np.frombuffer(t.raw_bytes(), dtype=dtype, count=t.size).reshape(t.shape)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _np_dtype(v: ir.Value) -> Any:
    dt = v.dtype
    if dt is None or dt == ir.DataType.UNDEFINED:
        return np.float32
    try:
        return dt.numpy()  # type: ignore[attr-defined]
    except Exception:
        return {
            ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64,
            ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32, ir.DataType.BOOL: np.bool_,
            ir.DataType.INT8: np.int8, ir.DataType.UINT8: np.uint8,
        }.get(dt, np.float32)


def float_dtype(v: ir.Value) -> Any:
    """The numpy dtype of a float value (``float32`` when ``v`` is not float or not typed)."""
    dt = v.dtype
    return dt.numpy() if dt is not None and dt.is_float else np.float32


def int_dtype(v: ir.Value) -> Any:
    """The numpy dtype of an integer value (``int64`` when ``v`` is not integer or not typed)."""
    dt = v.dtype
    return dt.numpy() if dt is not None and dt.is_integer else np.int64


def input_feeds(
    inputs: Sequence[ir.Value],
    batch: int,
    seq: int,
    rng: np.random.Generator,
    *,
    fixed: dict[int, np.ndarray] | None = None,
    past: int | None = None,
) -> dict[int, np.ndarray]:
    """Random feeds for graph inputs at ``batch`` × ``seq``: valid token ids, normal floats.

    Integer inputs get ids inside the table they index (0/1 when they index none); ``fixed``
    supplies some inputs as given (e.g. the attention mask under test). With ``past`` (a model
    with a KV cache), dims named like a past length get ``past``, dims named like a total length
    (``total_sequence``, ``past_sequence + sequence``) get ``past + seq``, and the third dim of an
    unnamed ``[batch, heads, ?, head_dim]`` float input is taken as a past length.
    """
    feeds: dict[int, np.ndarray] = dict(fixed or {})
    for v in inputs:
        if id(v) in feeds:
            continue
        dtype = _np_dtype(v)
        shape = v.shape
        dims = []
        rank = len(shape) if shape is not None else 2
        for i, d in enumerate(shape or (batch, seq)):
            if isinstance(d, int) and d > 0:
                dims.append(d)
                continue
            name = d.lower() if isinstance(d, str) and past is not None else ""
            if "+" in name or "total" in name:
                dims.append(past + seq)  # type: ignore[operator]
            elif "past" in name or "cache" in name:
                dims.append(past)  # type: ignore[arg-type]
            elif past is not None and rank == 4 and i == 2 and not np.issubdtype(dtype, np.integer) and not name:
                dims.append(past)
            else:
                dims.append(batch if i == 0 else seq)
        if np.issubdtype(dtype, np.integer):
            rows = index_rows(v) or 2
            feeds[id(v)] = rng.integers(0, max(1, min(rows, 1000)), size=dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[id(v)] = np.ones(dims, np.bool_)
        else:
            feeds[id(v)] = rng.standard_normal(dims).astype(dtype)
    return feeds
