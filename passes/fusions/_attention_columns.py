"""Which columns of a packed projection an attention operand reads, from the view it is taken of.

A fused QKV projection ``y = x @ W + b`` (``[B, S, C]``) is often viewed as ``[B, S, *dims]`` and
one role is then picked out of that view by a ``Gather`` (one index of an axis) or a ``Slice``
(a range of it). Bloom views its ``[B, S, 3·H]`` projection as ``[B, S, N, 3, d]`` (query, key
and value interleaved per head) and gathers index 0, 1, 2 of axis 3; Falcon views it as
``[B, S, N+2, d]`` and slices axis 2. The columns of ``y`` the picked value holds are a constant
function of the view, so a fused op can read them from a compile-time gather of the weight
columns and bias entries: exact, no runtime cost.

:func:`view_columns` computes them; which layout the result is in (``[N, d]`` per head, say) is
not assumed here — the attention check compares the operand with the projection's columns by
evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["view_columns"]


def view_columns(
    columns: int, dims: Sequence[int], axis: int, *, index: int | None = None,
    start: int | None = None, stop: int | None = None, step: int = 1,
) -> np.ndarray | str:
    """The projection columns, in the picked value's row-major order, that a pick of a view reads.

    Args:
        columns: the projection's column count ``C``.
        dims: the view's trailing dims ``dims`` (``[B, S, *dims]``; their product must be ``C``).
        axis: the picked axis, counted in ``dims`` (0 is the view's axis 2), or negative.
        index: a ``Gather`` of this one index (negative counts from the end), which drops the axis;
        start, stop, step: else a ``Slice`` of this range (clamped as ONNX clamps it), which keeps it.

    Returns:
        The 1-D int64 array of column indices ``cols`` such that the picked value, flattened over
        its trailing axes, is ``y[..., cols]``; or why the view cannot be read that way.
    """
    dims = [int(d) for d in dims]
    if any(d <= 0 for d in dims) or int(np.prod(dims)) != columns:
        return f"the view {dims} does not cover the {columns} projection columns"
    if not -len(dims) <= axis < len(dims):
        return f"axis {axis} is not a trailing axis of the view {dims}"
    axis %= len(dims)
    grid = np.arange(columns, dtype=np.int64).reshape(dims)
    size = dims[axis]
    if index is not None:
        if not -size <= index < size:
            return f"index {index} is out of range for an axis of {size}"
        picked = np.take(grid, index % size, axis=axis)
    else:
        if step == 0:
            return "a slice step of 0"
        picked = grid[(slice(None),) * axis + (slice(start, stop, step),)]
        if picked.size == 0:
            return "an empty slice"
    return picked.reshape(-1)
