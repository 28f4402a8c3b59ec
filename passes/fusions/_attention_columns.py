"""Which columns of a packed QKV projection each attention role reads, by index arithmetic.

Exporters often compute Q, K and V with one projection and then cut its output into the three
roles *after* a view, so each role's columns are not one contiguous block:

* GPT-NeoX: ``qkv.view(B, S, N, 3·d).transpose(1, 2).chunk(3, -1)``: head ``h`` of Q is the
  columns ``h·3d .. h·3d + d``, of K the next ``d``, of V the last ``d``;
* CodeGen: ``qkv.view(B, S, mp, 3·L).split(L, -1)`` (``mp`` model-parallel groups of ``L``
  columns each, roles in the order Q, V, K), each role then viewed as ``[B, S, N, d]``;
* Falcon's multi-query ``view(B, S, N + 2, d)`` and ModernBERT's ``view(B, S, 3, N, d)`` are
  the contiguous cases of the same arithmetic.

:func:`role_columns` follows the view (``Reshape``, ``Transpose``, ``Squeeze``/``Unsqueeze``)
and the cut (``Split``, ``Slice``, ``Gather`` or ``GatherND``) on an array of indices instead of data: the
projection output ``[tokens..., C]`` holds ``token · C + column``, every axis whose size the
graph does not fix (batch, sequence) has size 1, and the role's entries of the first token, in
the role's own axis order, are its columns. Nothing here is trusted: the attention check
(:mod:`passes.fusions._attention_check`) evaluates the model and requires each operand to equal
the heads of ``x @ W[:, columns] + b[columns]``, so a wrong reading is a near miss, never a
wrong fusion.
"""

from __future__ import annotations

import numpy as np

import ir

from ._rotary_layout import array_ints, static_dim, value_rank
from ..framework.match import const_array

__all__ = ["VIEW_OPS", "CUT_OPS", "role_columns"]

#: Ops a view of the projection output may be made of (they move data, never compute).
VIEW_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten"})
#: Ops that cut one role out of the viewed projection.
CUT_OPS = frozenset({"Split", "Slice", "Gather", "GatherND"})


def role_columns(role: ir.Value, view: list[ir.Node], columns: int) -> np.ndarray | str:
    """The projection columns that ``role`` holds, in its head order, or why they cannot be read.

    Args:
        role: an output of the cut (a ``Split``, ``Slice``, ``Gather`` or ``GatherND``, the last node of
            ``view``) that one attention operand is read from.
        view: the nodes from the projection output to the cut, in graph order: the first reads
            the projection output ``[tokens..., columns]`` (``[B, S, C]``, or ``[B·S, C]`` from
            a ``Gemm``), each next one the previous one's output.
        columns: the projection's ``C`` output columns.

    Returns:
        ``int64`` column indices, as many as the role has per token: entry ``i`` is the
        projection column that the ``i``-th element of one token's slice of ``role`` holds (the
        role's axes other than the token axes, flattened in order; for ``[B, N, S, d]`` or
        ``[B, S, N, d]`` that is head-major, as ``x @ W[:, cols]`` viewed as heads). A string
        when the view is not one the arithmetic can follow, or the role takes different
        columns for different tokens.
    """
    if not view or view[-1].op_type not in CUT_OPS or role.producer() is not view[-1]:
        return f"%{role.name} is not cut from a view of the projection"
    if any(n.op_type not in VIEW_OPS for n in view[:-1]):
        return "the view of the packed projection holds more than layout ops"
    first = view[0].inputs[0]
    rank = value_rank(first)
    if first is None or rank is None or rank < 2:
        return f"the packed projection output %{getattr(first, 'name', '?')} has no known rank"
    dims = [static_dim(first, i) or 1 for i in range(rank - 1)]
    tokens = int(np.prod(dims))
    # token · C + column: what each element of the projection output holds.
    index = (np.arange(tokens, dtype=np.int64).reshape(*dims, 1) * columns + np.arange(columns, dtype=np.int64))
    for node in view:
        out = role if node is view[-1] else node.outputs[0]
        step = _follow(node, index, out)
        if isinstance(step, str):
            return f"{node.label()} on the packed projection: {step}"
        index = step
    token, column = np.divmod(index.reshape(-1), columns)
    if token.size == 0:
        return f"%{role.name} holds no column of the packed projection"
    # Each token's entries in the role's order (a stable sort by token keeps it), one row a token.
    per_token = np.bincount(token, minlength=tokens)
    by_token = column[np.argsort(token, kind="stable")]
    if np.any(per_token != per_token[0]) or np.any(by_token.reshape(tokens, -1) != by_token[: per_token[0]]):
        return f"%{role.name} takes different columns of the packed projection for different tokens"
    return by_token[: per_token[0]].astype(np.int64)


def _follow(node: ir.Node, index: np.ndarray, out: ir.Value) -> np.ndarray | str:
    """``node`` applied to the index array (``out`` is the output the next step reads)."""
    op = node.op_type
    if node.domain:
        return "not a standard op"
    if op == "Identity":
        return index
    if op == "Transpose":
        perm = node.attr("perm")
        perm = list(reversed(range(index.ndim))) if perm is None else [int(p) for p in perm]
        return np.transpose(index, perm) if sorted(perm) == list(range(index.ndim)) else "a bad perm"
    if op == "Flatten":
        axis = int(node.attr("axis", 1)) % (index.ndim + 1)
        return index.reshape(int(np.prod(index.shape[:axis])), -1)
    if op == "Reshape":
        return _reshape(index, out)
    if op in ("Squeeze", "Unsqueeze"):
        axes = array_ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if axes is None and node.attr("axes") is not None:
            axes = [int(a) for a in node.attr("axes")]
        if axes is None:
            return "no constant axes"
        if op == "Squeeze":
            axes = [a % index.ndim for a in axes]
            if any(index.shape[a] != 1 for a in axes):
                return "squeezes an axis of columns"
            return np.squeeze(index, tuple(axes))
        rank = index.ndim + len(axes)
        return np.expand_dims(index, tuple(a % rank for a in axes))
    if op == "Split":
        return _split(node, index, out)
    if op == "Slice":
        return _slice(node, index)
    if op == "Gather":
        idx = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if idx is None:
            return "the gathered indices are not constant"
        axis = int(node.attr("axis", 0)) % index.ndim
        idx, dim = np.asarray(idx).astype(np.int64), index.shape[axis]
        if np.any(idx < -dim) or np.any(idx >= dim):
            return f"gathers past the {dim} entries of axis {axis}"
        return np.take(index, idx % dim, axis=axis)
    if op == "GatherND":  # dynamo's qkv[..., [-2], :] (Falcon), on the head axis moved to the front
        idx = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if idx is None or idx.ndim < 1 or int(node.attr("batch_dims", 0)) != 0 or idx.shape[-1] > index.ndim:
            return "the gathered indices are not constant index tuples"
        idx, dims = np.asarray(idx).astype(np.int64), np.array(index.shape[: idx.shape[-1]])
        if np.any(idx < -dims) or np.any(idx >= dims):
            return "gathers past the end of an axis"
        idx = idx % dims
        return index[tuple(idx[..., i] for i in range(idx.shape[-1]))]
    return f"{op} is not a view"


def _reshape(index: np.ndarray, out: ir.Value) -> np.ndarray | str:
    # Axes whose size the graph fixes keep it; the others (batch, sequence) are the size-1 token
    # axes of the index array, so the sizes must account for every column exactly.
    rank = value_rank(out)
    if rank is None:
        return "its output rank is not known"
    dims = [static_dim(out, i) or 1 for i in range(rank)]
    if int(np.prod(dims)) != index.size:
        return (f"its fixed dims {dims} (1: a dim the graph does not fix) do not hold the {index.size} "
                "entries per token; the view mixes token and column axes")
    return index.reshape(dims)


def _split(node: ir.Node, index: np.ndarray, out: ir.Value) -> np.ndarray | str:
    axis = int(node.attr("axis", 0)) % index.ndim
    n = len(node.outputs)
    sizes = array_ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if sizes is None and node.attr("split") is not None:
        sizes = [int(s) for s in node.attr("split")]
    dim = index.shape[axis]
    if sizes is None:
        if dim % n and node.attr("num_outputs") is None:
            return f"axis {axis} of {dim} entries does not split in {n} equal parts"
        part = -(-dim // n)  # opset 18's num_outputs: the last part may be shorter
        sizes = [min(part, dim - i * part) for i in range(n)]
    if len(sizes) != n or sum(sizes) != dim:
        return f"split sizes {sizes} do not cover the {dim} entries of axis {axis}"
    i = next(k for k, o in enumerate(node.outputs) if o is out)
    start = sum(sizes[:i])
    return np.take(index, np.arange(start, start + sizes[i]), axis=axis)


def _slice(node: ir.Node, index: np.ndarray) -> np.ndarray | str:
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends = array_ints(inputs[1]), array_ints(inputs[2])
    if starts is None or ends is None:
        return "the slice bounds are not constant"
    axes = array_ints(inputs[3]) if inputs[3] is not None else list(range(len(starts)))
    steps = array_ints(inputs[4]) if inputs[4] is not None else [1] * len(starts)
    if axes is None or steps is None or not len(axes) == len(starts) == len(ends) == len(steps) or 0 in steps:
        return "the slice axes or steps are not constant"
    for a, s, e, st in zip(axes, starts, ends, steps):
        a %= index.ndim
        # Python's slice clamping is ONNX's (negative bounds count from the end).
        index = np.take(index, np.arange(index.shape[a])[s:e:st], axis=a)
    return index
