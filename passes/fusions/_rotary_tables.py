"""The semantic half of fuse-rotary: cos/sin operands evaluated into caches, positions traced.

A rotary multiplies ``x`` by ``cos`` and ``rotate(x)`` by ``sin``, both ``[1, 1, S, d]`` (or
``[1, S, 1, d]`` before the heads transpose) functions of the token positions. Exporters compute
them in many ways — ``Cos(Concat(f, f))`` of ``positions * inv_freq`` (Llama), a lookup in a
constant table (ESM), a ``[sin | cos]`` table split and repeated element-wise with Tile (GPT-J) or
chunked, stacked and reshaped (RoFormer), scaled, cast — so instead of recognising each spelling,
:class:`TableEvaluator` *evaluates* the operand:

1. walk back from the operand to the positions it is indexed by (``start + Range(S)``, or a
   ``[B, S]`` int64 positions input); every other leaf must be a constant;
2. run that subgraph on positions ``0 .. P-1`` (``P``: the lookup table's rows, else
   ``max_positions``), node by node with the constant folder's evaluator;
3. run it again on a few positions out of order: the rows must be the same (the operand is a
   function of each position alone, not of the sequence length);
4. the result must broadcast as ``[1, 1|P, 1|P, d]`` with the two halves (rotate-half) or the
   even/odd columns (interleaved) equal: that half is the cache onnxruntime wants.

Then ``RotaryEmbedding`` computes exactly what the graph did, whatever the table holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import ir

from ..framework.evaluator import evaluate
from ..framework.match import const_array, operands, producer, scalar
from ..framework.rewriter import Rewriter
from ._rotary_layout import unsqueeze_axes

__all__ = ["Table", "TableEvaluator", "position_ids", "position_start"]

#: Nodes a table computation may take; a larger cone is not a position table.
_MAX_CONE = 256
#: Positions of the second, out-of-order probe (clipped to the table).
_SHUFFLED = (5, 0, 3, 11, 1)


@dataclass(frozen=True)
class Table:
    """A cos or sin operand understood: its cache and where the positions come from.

    Attributes:
        half: ``[P, d/2]`` float32, the cache onnxruntime reads (row ``p``: position ``p``).
        pos: the integer positions the operand is a function of.
        seq_axis: the operand's sequence axis, counted in 4-D: 2 for ``[B, N, S, d]``, 1 for
            ``[B, S, N, d]``.
    """

    half: np.ndarray
    pos: ir.Value
    seq_axis: int


# ------------------------------------------------------------------------------------------------
# Positions
# ------------------------------------------------------------------------------------------------


def position_start(pos: ir.Value) -> tuple[list[ir.Value | int], ir.Value | None] | str:
    """``pos = start + arange(S)`` broadcast: the terms of ``start``, or a ``[B, S]`` graph input.

    Returns ``(terms, None)`` with constant ints and scalar values whose sum is the start, or
    ``([], value)`` for a 2-D int64 positions graph input, or why not.
    """
    if pos.is_graph_input():
        if pos.dtype == ir.DataType.INT64 and pos.shape is not None and len(pos.shape) == 2:
            return [], pos
        return f"positions input {pos.name!r} is not int64 [B, S]"
    terms: list[ir.Value | int] = []
    for p in _position_chain(pos):
        if p.op_type == "Add":
            _, b = _offset_operands(p)  # type: ignore[misc]
            c = scalar(b)
            terms.append(int(c) if c is not None else b)
    base = producer(_chain_base(pos))
    if base is not None and base.op_type == "Range":
        if scalar(base.inputs[2]) != 1:
            return "positions Range step is not 1"
        c = scalar(base.inputs[0])
        terms.append(int(c) if c is not None else base.inputs[0])  # type: ignore[arg-type]
        return terms, None
    if base is not None and base.op_type == "Add":
        return "positions are added to a non-scalar offset"
    return "positions are not start + Range(S) (nor a [B, S] positions input)"


def _offset_operands(p: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """``(positions, offset)`` of ``Add(positions, scalar offset)``."""
    for a, b in operands(p):
        if producer(a, "Range", "Unsqueeze", "Expand", "Add") is not None and _scalar_like(b):
            return a, b  # type: ignore[return-value]
    return None


def _position_chain(pos: ir.Value) -> list[ir.Node]:
    """The broadcasting nodes between ``start + Range`` (or its parts) and ``pos``, outermost first."""
    chain: list[ir.Node] = []
    v: ir.Value | None = pos
    for _ in range(16):
        p = producer(v)
        if p is None:
            break
        if p.op_type in ("Unsqueeze", "Expand", "Identity") or (p.op_type == "Cast" and p.attr("to") in (6, 7)):
            chain.append(p)
            v = p.inputs[0]
            continue
        if p.op_type == "Add" and _offset_operands(p) is not None:
            chain.append(p)
            v = _offset_operands(p)[0]  # type: ignore[index]
            continue
        break
    return chain


def _chain_base(pos: ir.Value) -> ir.Value:
    chain = _position_chain(pos)
    if not chain:
        return pos
    last = chain[-1]
    return _offset_operands(last)[0] if last.op_type == "Add" else last.inputs[0]  # type: ignore[index,return-value]


def _scalar_like(v: ir.Value | None) -> bool:
    """A one-element value: a constant, or a dynamic scalar (0-d, or ``[1]``)."""
    if v is None:
        return False
    arr = const_array(v)
    if arr is not None:
        return arr.size == 1
    if v.shape is not None:
        return all(d == 1 for d in v.shape)
    p = v.producer()
    # Shape arithmetic scalars of TorchScript exports carry no types: Gather of one index.
    return p is not None and p.op_type in ("Gather", "Squeeze", "Cast", "Add", "Sub") and all(
        i is None or _scalar_like(i) or producer(i, "Shape") is not None for i in p.inputs[1:]
    )


def _positions_layout(pos: ir.Value) -> tuple[int, int] | None:
    """``(rank, axis)`` of the sequence in ``pos``: Range gives ``[S]``, each Unsqueeze and Expand
    of the chain moves it (broadcast dims stay 1 in the probe)."""
    if pos.is_graph_input():
        return (2, 1) if pos.shape is not None and len(pos.shape) == 2 else None
    rank, axis = 1, 0
    for p in reversed(_position_chain(pos)):
        if p.op_type == "Unsqueeze":
            axes = unsqueeze_axes(p)
            if axes is None:
                return None
            out = rank + len(axes)
            inserted = sorted(a + out if a < 0 else a for a in axes)
            kept = [i for i in range(out) if i not in inserted]
            if len(kept) != rank:
                return None
            rank, axis = out, kept[axis]
        elif p.op_type == "Expand":
            shape = p.inputs[1]
            k = shape.shape[0] if shape is not None and shape.shape is not None and len(shape.shape) == 1 else None
            arr = const_array(shape)
            k = int(arr.size) if arr is not None else k
            if not isinstance(k, int):
                return None
            out = max(rank, k)
            rank, axis = out, axis + out - rank
    if pos.shape is not None and len(pos.shape) != rank:
        return None
    return rank, axis


def position_ids(pos: ir.Value, before: ir.Node, rw: Rewriter) -> ir.Value:
    """The ``position_ids`` input for positions ``pos``: the ``[B, S]`` input itself, or the start
    as a 1-element int64 (onnxruntime then reads positions ``start + s``), built before ``before``."""
    start = position_start(pos)
    assert not isinstance(start, str)
    terms, direct = start
    if direct is not None:
        return direct
    g = before.graph
    assert g is not None
    const = sum(t for t in terms if isinstance(t, int))
    value: ir.Value | None = None
    for t in terms:
        if isinstance(t, int):
            continue
        if t.dtype != ir.DataType.INT64:
            t = rw.make("Cast", [t], {"to": 7}, before=before, name="rotary_pos_cast").outputs[0]  # type: ignore
        value = t if value is None else rw.make("Add", [value, t], before=before, name="rotary_pos").outputs[0]
    if value is None or const:
        c = rw.constant(g, np.array([const], dtype=np.int64), name="rotary_position_start")
        value = c if value is None else rw.make("Add", [value, c], before=before, name="rotary_pos").outputs[0]
    return value


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


class TableEvaluator:
    """Evaluates cos/sin operands into caches; one per pass run (results are memoized by value).

    Args:
        max_positions: rows of the caches of computed tables (a lookup keeps its table's rows).
        opset: the default-domain opset the nodes are evaluated at.
    """

    def __init__(self, max_positions: int, opset: int) -> None:
        self.max_positions = max_positions
        self.opset = opset
        self._tables: dict[tuple[int, bool], tuple[ir.Value, Table | str]] = {}
        self._arrays: dict[tuple[tuple[int, bytes, int], int], tuple[ir.Value, np.ndarray]] = {}
        self._interned: dict[tuple[tuple[int, ...], bytes], np.ndarray] = {}

    def table(self, v: ir.Value, kind: str, interleaved: bool) -> Table | str:
        """The cache behind the cos or sin operand ``v`` (``kind`` names it in reasons)."""
        key = (id(v), interleaved)
        got = self._tables.get(key)
        if got is None:
            got = (v, self._table(v, kind, interleaved))
            self._tables[key] = got
        return got[1]

    def _table(self, v: ir.Value, kind: str, interleaved: bool) -> Table | str:
        cone = _cone(v)
        if isinstance(cone, str):
            return f"{kind}: {cone}"
        nodes, pos = cone
        layout = _positions_layout(pos)
        if layout is None:
            return f"{kind}: the layout of the positions %{pos.name} is not understood"
        n = _lookup_rows(nodes, pos) or self.max_positions
        full = self._run(nodes, pos, v, np.arange(n), layout)
        if isinstance(full, str):
            return f"{kind} cannot be evaluated on positions 0..{n - 1}: {full}"
        shaped = _as_table(full, n)
        if isinstance(shaped, str):
            return f"{kind}: {shaped}"
        tab, seq_axis = shaped
        picks = np.array([p for p in _SHUFFLED if p < n] or [0])
        part = self._run(nodes, pos, v, picks, layout)
        sub = part if isinstance(part, str) else _as_table(part, picks.size)
        if isinstance(sub, str) or sub[1] != seq_axis or not np.allclose(sub[0], tab[picks], rtol=1e-5, atol=1e-6):
            return f"{kind} is not a function of each position alone (it changes with the sequence length)"
        d = tab.shape[1]
        if d % 2:
            return f"{kind} has an odd width {d}"
        lo, hi = (tab[:, 0::2], tab[:, 1::2]) if interleaved else (tab[:, : d // 2], tab[:, d // 2:])
        if not np.allclose(lo, hi, rtol=1e-6, atol=1e-6):
            form = "even and odd columns" if interleaved else "two halves"
            return f"the {kind} table's {form} differ: not a rotary table for this rotation"
        half = np.ascontiguousarray(lo, dtype=np.float32)
        half = self._interned.setdefault((half.shape, half.tobytes()), half)  # one array per distinct cache
        return Table(half, pos, seq_axis)

    def _run(self, nodes: list[ir.Node], pos: ir.Value, out: ir.Value, positions: np.ndarray,
             layout: tuple[int, int]) -> np.ndarray | str:
        """Evaluate ``out`` with ``pos`` holding ``positions`` along its sequence axis (or say which
        node could not be)."""
        rank, axis = layout
        shape = [1] * rank
        shape[axis] = positions.size
        dtype = pos.dtype.numpy() if pos.dtype is not None else np.int64
        # Operands of different layers share most of their cone (one rotary_emb): memoize per probe
        # (0..n-1, or the handful of shuffled positions).
        probe = (positions.size, positions[:8].tobytes(), id(pos))
        vals: dict[int, np.ndarray | None] = {id(pos): positions.astype(dtype).reshape(shape)}
        for node in nodes:
            outs = [o for o in node.outputs if o is not None]
            known = [self._arrays.get((probe, id(o))) for o in outs]
            if all(k is not None for k in known):
                vals.update((id(o), k[1]) for o, k in zip(outs, known))  # type: ignore[index]
                continue
            ins = [None if i is None else vals[id(i)] if id(i) in vals else const_array(i) for i in node.inputs]
            res = None if any(i is not None and a is None for i, a in zip(node.inputs, ins)) else \
                evaluate(node, ins, opset=self.opset)
            if res is None:
                return f"{node.label()} fails"
            for o, r in zip(node.outputs, res):
                if o is not None:
                    vals[id(o)] = r
                    if len(o.uses()) > 1:  # shared by other operands' cones
                        self._arrays[(probe, id(o))] = (o, r)
        got = vals.get(id(out))
        return got if got is not None else f"%{out.name} is not computed"


def _lookup_rows(nodes: list[ir.Node], pos: ir.Value) -> int | None:
    """The rows of the constant tables the positions index (a lookup covers no more), if any."""
    dependent = {id(pos)}
    rows = []
    for node in nodes:
        if node.op_type in ("Gather", "GatherND") and len(node.inputs) > 1 and id(node.inputs[1]) in dependent:
            table = const_array(node.inputs[0])
            axis = node.attr("batch_dims", 0) if node.op_type == "GatherND" else node.attr("axis", 0)
            if table is not None and table.ndim > 0:
                rows.append(int(table.shape[axis]))
        if any(i is not None and id(i) in dependent for i in node.inputs):
            dependent.update(id(o) for o in node.outputs if o is not None)
    return min(rows) if rows else None


def _as_table(arr: np.ndarray, n: int) -> tuple[np.ndarray, int] | str:
    """``arr`` as ``[1, 1|n, 1|n, d]`` → ``([n, d], sequence axis)``."""
    if arr.ndim > 4:
        return f"has rank {arr.ndim}, not a [1, 1, S, d] table"
    shape = (1,) * (4 - arr.ndim) + tuple(arr.shape)
    if n > 1:
        seq = [i for i in range(3) if shape[i] == n]
        others = [shape[i] for i in range(3) if i not in seq]
    else:
        seq, others = [2], [shape[0], shape[1]]
    if len(seq) != 1 or any(o != 1 for o in others) or seq[0] == 0:
        return f"evaluates to shape {list(arr.shape)}, not [1, 1, S, d] (nor [1, S, 1, d]) over {n} positions"
    return arr.reshape(n, shape[3]).astype(np.float32), seq[0]


def _cone(v: ir.Value) -> tuple[list[ir.Node], ir.Value] | str:
    """The nodes computing ``v`` from constants and one positions value, in topological order."""
    order: list[ir.Node] = []
    done: set[int] = set()
    pos: ir.Value | None = None
    stack: list[tuple[ir.Value, bool]] = [(v, False)]
    while stack:
        u, expanded = stack.pop()
        p = u.producer()
        if expanded:
            assert p is not None
            if id(p) not in done:
                done.add(id(p))
                order.append(p)
            continue
        if (p is not None and id(p) in done) or const_array(u) is not None:
            continue
        if pos is u or (u is not v and not isinstance(position_start(u), str)):
            if pos is not None and pos is not u:
                return f"indexed by two position tensors (%{pos.name}, %{u.name})"
            pos = u
            continue
        if p is None:
            return f"depends on %{u.name}, not only on positions"
        if p.domain or p.subgraphs():
            return f"depends on {p.label()}"
        if len(done) + len(stack) > _MAX_CONE:
            return "is computed by too large a subgraph to be a position table"
        stack.append((u, True))
        for i in p.inputs:
            if i is not None:
                stack.append((i, False))
    if pos is None:
        return "does not depend on the positions"
    return order, pos
