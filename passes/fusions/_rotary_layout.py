"""Shape facts the rotary checks need: slice bounds, last axes, ranks and static head counts.

Exports often carry symbolic dims where a rotary needs a number (TorchScript: ``[batch, unk__9,
sequence, 16]``). :func:`static_dim` recovers it from the producers: a ``Transpose`` moves the
axis, a ``Slice``/``Split`` of another axis keeps it, and a ``Reshape`` that splits the hidden axis
into heads divides what is left once the dims it keeps (same symbol or same number) cancel.
"""

from __future__ import annotations

from collections import Counter
from math import prod
from typing import Any

import numpy as np

import ir

from ..framework.match import const_array

__all__ = ["INT_MAX", "array_ints", "last_axis", "slice_params", "static_dim", "unsqueeze_axes", "value_rank"]

#: Slice "to the end" bounds are INT64_MAX; anything this large means the same.
INT_MAX = 2**62


def value_rank(v: ir.Value | None, depth: int = 0) -> int | None:
    """The rank of ``v``: its shape, else what its producer says (a Transpose's perm, a slice's input)."""
    if v is None:
        return None
    if v.shape is not None:
        return len(v.shape)
    p = v.producer()
    if p is None or p.domain or depth > 8:
        return None
    if p.op_type == "Transpose" and p.attr("perm") is not None:
        return len(p.attr("perm"))
    if p.op_type in ("Slice", "Neg", "Cast", "Identity", "Split"):
        return value_rank(p.inputs[0], depth + 1)
    if p.op_type == "Reshape":
        return _length(p.inputs[1], depth + 1)
    if p.op_type in ("Add", "Sub", "Mul", "Div", "MatMul"):  # broadcasting: the largest input rank
        ranks = [a.ndim if (a := const_array(i)) is not None else value_rank(i, depth + 1) for i in p.inputs]
        if None in ranks or p.op_type == "MatMul" and min(ranks) < 2:  # type: ignore[operator]
            return None
        return max(ranks)  # type: ignore[type-var]
    if p.op_type == "Gemm":
        return 2
    return None


def _length(v: ir.Value | None, depth: int = 0) -> int | None:
    """The number of entries of a 1-D shape vector (a Reshape target), when the graph fixes it."""
    if v is None or depth > 8:
        return None
    arr = const_array(v)
    if arr is not None:
        return int(arr.size)
    if v.shape is not None and len(v.shape) == 1 and isinstance(v.shape[0], int):
        return int(v.shape[0])
    p = v.producer()
    if p is None or p.domain:
        return None
    if p.op_type == "Concat":
        parts = [_length(i, depth + 1) for i in p.inputs]
        return sum(parts) if all(n is not None for n in parts) else None  # type: ignore[misc]
    if p.op_type in ("Unsqueeze", "Squeeze") and value_rank(p.inputs[0], depth + 1) == 0:
        return 1
    if p.op_type == "Shape":
        rank = value_rank(p.inputs[0], depth + 1)
        if rank is None:
            return None
        lo, hi = p.attr("start", 0), p.attr("end", rank)
        return len(range(rank)[lo:hi])
    if p.op_type == "Slice":
        n, sp = _length(p.inputs[0], depth + 1), slice_params(p, 1)
        return len(range(n)[sp[1]:sp[2]:sp[3]]) if n is not None and sp is not None and sp[3] else None
    return None


def _axis(a: int, rank: int | None) -> int | None:
    if a >= 0:
        return a
    return a + rank if rank is not None else None


def slice_params(node: ir.Node, rank: int | None) -> tuple[int, int, int, int] | None:
    """``(axis, start, end, step)`` of a one-axis Slice with constant bounds (axis normalized)."""
    if node.op_type != "Slice" or len(node.inputs) < 3:
        return None
    starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if axes is not None and axes.size != 1 or steps is not None and steps.size != 1:
        return None
    axis = _axis(int(axes.reshape(-1)[0]), rank) if axes is not None else 0
    if axis is None:
        return None
    step = 1 if steps is None else int(steps.reshape(-1)[0])
    return axis, int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), step


def last_axis(node: ir.Node, rank: int | None) -> bool:
    """The node's ``axis`` attribute (default 0) names the last axis of a rank-``rank`` tensor."""
    axis = node.attr("axis", 0)
    return axis == -1 or (rank is not None and axis == rank - 1)


def unsqueeze_axes(node: ir.Node) -> list[int] | None:
    """The axes an Unsqueeze inserts (an input since opset 13, an attribute before)."""
    arr = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if arr is None:
        attr = node.attr("axes")
        return [int(a) for a in attr] if attr is not None else None
    return [int(a) for a in arr.reshape(-1)]


def static_dim(v: ir.Value | None, axis: int, depth: int = 0) -> int | None:
    """The size of ``v``'s axis ``axis`` when the graph fixes it, else ``None``."""
    if v is None or depth > 12:
        return None
    rank = value_rank(v)
    axis = _axis(axis, rank)  # type: ignore[assignment]
    if axis is None:
        return None
    if v.shape is not None and axis < len(v.shape) and isinstance(v.shape[axis], int):
        return int(v.shape[axis])
    arr = const_array(v)
    if arr is not None:
        return int(arr.shape[axis]) if axis < arr.ndim else None
    p = v.producer()
    if p is None or p.domain or not p.inputs or p.inputs[0] is None:
        return None
    src = p.inputs[0]
    if p.op_type in ("Neg", "Cast", "Identity"):
        return static_dim(src, axis, depth + 1)
    if p.op_type == "Transpose":
        perm = p.attr("perm")
        return static_dim(src, int(perm[axis]), depth + 1) if perm is not None and axis < len(perm) else None
    if p.op_type == "Slice":
        sp = slice_params(p, rank)
        if sp is None or sp[0] != axis:
            return static_dim(src, axis, depth + 1) if sp is not None else None
        whole = static_dim(src, axis, depth + 1)  # a slice of this axis: what its bounds keep
        return len(range(whole)[sp[1]:sp[2]:sp[3]]) if whole is not None and sp[3] else None
    if p.op_type == "Split":
        split_axis = _axis(int(p.attr("axis", 0)), rank)
        return static_dim(src, axis, depth + 1) if split_axis is not None and split_axis != axis else None
    if p.op_type == "Reshape":
        return _reshaped_dim(p, v, axis, depth)
    return None


def _reshaped_dim(p: ir.Node, out: ir.Value, axis: int, depth: int) -> int | None:
    """The ``axis`` dim of a Reshape's output: its target entry, or what the input holds once the
    other entries cancel against it (equal sizes, equal symbols, dims copied off a ``Shape``)."""
    src = p.inputs[0]
    rank = value_rank(src)
    if src is None or rank is None:
        return None
    entries = _entries(p.inputs[1], depth + 1)
    outs: list[Any] = []
    if entries is not None:
        for i, e in enumerate(entries):
            if isinstance(e, int):
                outs.append(e if e > 0 else _token(src, i, depth) if e == 0 else None)
            elif e is not None:
                outs.append(_token(e[0], e[1], depth))
            else:
                d = out.shape[i] if out.shape is not None and i < len(out.shape) else None
                outs.append(d if isinstance(d, int) else ("sym", d) if isinstance(d, str) else None)
    elif out.shape is not None:
        outs = [d if isinstance(d, int) else ("sym", d) if isinstance(d, str) else None for d in out.shape]
    if axis >= len(outs):
        return None
    if isinstance(outs[axis], int):
        return outs[axis]
    others = [d for i, d in enumerate(outs) if i != axis]
    if any(d is None for d in others):
        return None  # a second unknown
    ins = [_token(src, i, depth) for i in range(rank)]
    if Counter(d for d in ins if not isinstance(d, int)) != Counter(d for d in others if not isinstance(d, int)):
        return None  # symbols that do not cancel: the size is not fixed
    num = prod(d for d in ins if isinstance(d, int))
    den = prod(d for d in others if isinstance(d, int))
    return num // den if den > 0 and num % den == 0 else None


def _token(v: ir.Value, i: int, depth: int) -> Any:
    """Dim ``i`` of ``v``: its size when fixed, else a symbol standing for it."""
    d = static_dim(v, i, depth + 1)
    if d is not None:
        return d
    s = v.shape[i] if v.shape is not None and i < len(v.shape) else None
    return ("sym", s) if isinstance(s, str) else ("of", id(v), i)


def _entries(v: ir.Value | None, depth: int) -> list[int | tuple[ir.Value, int] | None] | None:
    """A shape vector entry by entry: constants, ``(t, j)`` for dim ``j`` of ``t`` copied off a
    ``Shape``, ``None`` for anything else; ``None`` when even its length is unknown."""
    if v is None or depth > 12:
        return None
    ints = array_ints(v)
    if ints is not None:
        return list(ints)
    p = v.producer()
    if p is not None and not p.domain:
        if p.op_type == "Concat":
            parts = [_entries(i, depth + 1) for i in p.inputs]
            return None if any(q is None for q in parts) else [e for q in parts for e in q]  # type: ignore[union-attr]
        if p.op_type == "Shape" and (rank := value_rank(p.inputs[0])) is not None:
            return [(p.inputs[0], j) for j in range(rank)[p.attr("start", 0):p.attr("end", rank)]]  # type: ignore[misc]
        if p.op_type == "Cast":
            return _entries(p.inputs[0], depth + 1)
        if p.op_type == "Slice" and (sp := slice_params(p, 1)) is not None and sp[3]:
            whole = _entries(p.inputs[0], depth + 1)
            return None if whole is None else whole[sp[1]:sp[2]:sp[3]]
        if p.op_type == "Unsqueeze" and (g := p.inputs[0].producer()) is not None and g.op_type == "Gather":
            whole, idx = _entries(g.inputs[0], depth + 1), array_ints(g.inputs[1])
            if whole is not None and idx is not None and len(idx) == 1 and -len(whole) <= idx[0] < len(whole):
                return [whole[idx[0]]]
    n = _length(v, depth + 1)
    return None if n is None else [None] * n


def array_ints(v: ir.Value | None) -> list[int] | None:
    """A constant's entries as ints."""
    arr = const_array(v)
    return None if arr is None else [int(a) for a in np.asarray(arr).reshape(-1)]
