"""Canonical indexing: constant-index gathers become Slices, and a Slice between Transposes moves before them.

Exporters write one selection of a range along an axis in several ways. TorchScript writes
``qkv[..., [-2], :]`` as ``Gather(qkv, [-2], axis=2)``; the dynamo exporter moves the axis first
and gathers there: ``Transpose(GatherND(Transpose(qkv, [2, 0, 1, 3]), [[-2]]), [1, 0, 2, 3])``.
These rules bring both to one form, ``Transpose(Slice(qkv, [4], [5], axes=[2]), [0, 2, 1, 3])``,
so every fusion downstream reads a Slice of the axis it cares about:

* ``gather-nd-to-gather``: ``GatherND(x, i)`` with constant ``i`` of shape ``[..., 1]`` (and
  ``batch_dims`` 0) indexes axis 0 only: it is ``Gather(x, i[..., 0], axis=0)``.
* ``gather-to-slice``: ``Gather(x, i, axis=a)`` with constant 1-D ``i`` in arithmetic progression
  (step ≥ 1) is ``Slice(x, [i0], [i_last + 1], [a], [step])``.
* ``slice-between-transposes``: ``Transpose(Slice(Transpose(x, p1), axes=A), p2)`` is
  ``Transpose(Slice(x, axes=p1[A]), p1∘p2)`` (no Transpose when ``p1∘p2`` is the identity). The
  inner Transpose may be read elsewhere: those readers get an equal one.

Each is exact on every input the original accepts: the Slice takes the same elements in the same
order. A negative index is made positive when the axis' size is known; otherwise the indices must
all have one sign (the Slice bounds are then relative to the same end as the Gather's).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..framework.base import PassContext
from ..framework.pattern import Match, PatternRule, absent_or, capture
from ..framework.rules import NoMatch

__all__ = ["INDEXING_RULES", "GATHER_ND_TO_GATHER", "GATHER_TO_SLICE", "SLICE_BETWEEN_TRANSPOSES", "slice_bounds"]

#: Slice's "to the end" bound.
_END = np.iinfo(np.int64).max


class _CanonicalRule(PatternRule):
    """A pattern rule whose misses are never near ones: a canonical form that does not apply says
    nothing a user can act on (the fusion that needed it explains itself under ``--explain``)."""

    def match(self, node: Any, ctx: PassContext | None = None) -> Match | NoMatch:
        m = super().match(node, ctx)
        return NoMatch(m.reason, near=False, score=m.score) if isinstance(m, NoMatch) else m


def _int_array(a: np.ndarray | None) -> np.ndarray | None:
    return a if a is not None and a.dtype in (np.int32, np.int64) else None


# -- GatherND(x, [[i], [j], ...]) → Gather(x, [i, j, ...], axis=0) -----------------------------
def _gather_nd(op, x):
    return op.GatherND(x, op.const(name="indices"), batch_dims=absent_or(0))


def _check_gather_nd(m: Match, ctx: PassContext) -> Any:
    idx = _int_array(m.const("indices"))
    if idx is None or idx.ndim < 1 or idx.shape[-1] != 1:
        return NoMatch("indices are not an integer constant of shape [..., 1]")
    return True


def _gather_nd_as_gather(op, x, match):
    return op.Gather(x, match.const("indices")[..., 0].astype(np.int64), axis=0)


GATHER_ND_TO_GATHER = _CanonicalRule("gather-nd-to-gather", _gather_nd, _gather_nd_as_gather,
                                     check=_check_gather_nd, stat="GatherND to Gather")


# -- Gather(x, [i0, i0 + s, ...], axis) → Slice(x, [i0], [i_last + 1], [axis], [s]) ------------
def _gather(op, x):
    return op.Gather(x, op.const(name="indices"), axis=capture("axis"))


def slice_bounds(indices: np.ndarray, dim: Any) -> tuple[int, int, int] | str:
    """``(start, end, step)`` of the Slice that takes ``indices`` (1-D) along an axis of size ``dim``
    (an int, or anything else when unknown), or why there is none."""
    picks = [int(i) for i in indices]
    if isinstance(dim, int):
        if any(not -dim <= i < dim for i in picks):
            return f"an index is out of range for the axis of size {dim}"
        picks = [i + dim if i < 0 else i for i in picks]
    elif min(picks) < 0 <= max(picks):
        return "indices of both signs on an axis of unknown size"
    steps = {b - a for a, b in zip(picks, picks[1:])}
    step = steps.pop() if len(steps) == 1 else 1
    if steps or step < 1:
        return f"indices {picks[:6]} are not an increasing arithmetic progression"
    end = picks[-1] + 1
    return picks[0], (_END if end == 0 and picks[-1] < 0 else end), step


def _check_gather(m: Match, ctx: PassContext) -> Any:
    idx = _int_array(m.const("indices"))
    if idx is None or idx.ndim != 1 or idx.size == 0:
        return NoMatch("indices are not a non-empty 1-D integer constant")
    shape, axis = m.x.shape, m.axis or 0
    dim = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
    bounds = slice_bounds(idx, dim)
    return True if not isinstance(bounds, str) else NoMatch(bounds)


def _gather_as_slice(op, x, axis, match):
    shape, axis = x.shape, axis or 0
    dim = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
    start, end, step = slice_bounds(match.const("indices"), dim)  # type: ignore[misc]
    return op.Slice(x, np.array([start]), np.array([end]), np.array([axis]), np.array([step]))


GATHER_TO_SLICE = _CanonicalRule("gather-to-slice", _gather, _gather_as_slice, check=_check_gather,
                                 stat="Gather to Slice")


# -- Transpose(Slice(Transpose(x, p1), axes), p2) → Transpose(Slice(x, p1[axes]), p1∘p2) -------
def _sandwich(op, x, starts, ends):
    inner = op.Transpose(x, perm=capture("p1"), _name="inner")
    c = dict(_name="slice")
    s = (op.Slice(inner, starts, ends, op.const(name="axes"), op.const(name="steps"), **c)
         | op.Slice(inner, starts, ends, op.const(name="axes"), **c) | op.Slice(inner, starts, ends, **c))
    return op.Transpose(s, perm=capture("p2"))


def _perms(m: Match) -> tuple[list[int], list[int], list[int]] | str:
    """The two perms (defaults made explicit) and the new Slice's axes, or why they are unknown."""
    given = next((len(p) for p in (m.p1, m.p2) if p is not None), None)
    r = given if given is not None else len(m.x.shape) if m.x.shape is not None else None
    if r is None:
        return "default perms of an input of unknown rank"
    p1, p2 = (list(p) if p is not None else list(range(r))[::-1] for p in (m.p1, m.p2))
    if m.axes is not None:
        axes = _int_array(m.const("axes"))
    else:  # absent: the first len(starts) axes
        starts = m.const("starts")
        axes = None if starts is None else np.arange(starts.size)
    if axes is None:
        return "the Slice's axes are not known"
    axes = [int(a) + r if int(a) < 0 else int(a) for a in axes.reshape(-1)]
    if len(p1) != r or len(p2) != r or any(not 0 <= a < r for a in axes):
        return "perms and axes of different ranks"
    return p1, p2, [p1[a] for a in axes]


def _check_sandwich(m: Match, ctx: PassContext) -> Any:
    perms = _perms(m)
    return True if not isinstance(perms, str) else NoMatch(perms)


def _slice_first(op, x, starts, ends, match, steps=None):
    p1, p2, axes = _perms(match)  # type: ignore[misc]
    s = op.Slice(x, starts, ends, np.array(axes, np.int64), steps)
    perm = [p1[i] for i in p2]
    out = s if perm == list(range(len(perm))) else op.Transpose(s, perm=perm)
    if not match.read_elsewhere("inner"):
        return out
    return {"out": out, "inner": op.Transpose(x, perm=p1)}  # the other readers get an equal Transpose


SLICE_BETWEEN_TRANSPOSES = _CanonicalRule("slice-between-transposes", _sandwich, _slice_first,
                                          check=_check_sandwich, stat="moved a Slice before Transposes")

#: The rules of this module, in the order simplify applies them.
INDEXING_RULES = (GATHER_ND_TO_GATHER, GATHER_TO_SLICE, SLICE_BETWEEN_TRANSPOSES)
