"""fuse-rotary: rotary position embeddings → onnxruntime's ``com.microsoft::RotaryEmbedding``.

Two pattern rules. ``rotary`` (``x`` is Q or K of one head layout, ``[B, N, S, h]`` or, before the
heads transpose, ``[B, S, N, h]``)::

    rotate-half:  y = x * cos + Concat(Neg(x[..., h/2:]), x[..., :h/2]) * sin
    interleaved:  y = x * cos + Reshape(Concat(Unsqueeze(Neg(x[..., 1::2]), -1),
                                               Unsqueeze(x[..., 0::2], -1), axis=-1)) * sin

The products and their operands may come in any order. Syntax stops at ``cos`` and ``sin``: the
check evaluates them (:mod:`._rotary_tables`) on positions ``0 .. P-1`` into the ``[P, d/2]``
caches, whatever the exporter wrote (computed ``Cos(positions * inv_freq)``, a lookup table,
GPT-J's split and tiled ``[sin | cos]`` table, RoFormer's chunked sinusoidal one), and traces the
positions to ``start + arange(S)`` (or a ``[B, S]`` positions input). The op gets that start as a
1-element ``position_ids`` ("positions ``start + s``").

``partial-rotary`` (GPT-NeoX, Phi, StableLM rotate-half; GPT-J, CodeGen interleaved): a rotary of
the first ``r`` dims of each head, the rest passed through::

    Concat(RotaryEmbedding(x[..., :r]), x[..., r:])  →  RotaryEmbedding(x, rotary_embedding_dim=r)

(through the heads transposes for ``[B, S, N, h]``), once ``rotary`` fused the slice.

Runtime contract (onnxruntime 1.32 CPU, ``contrib_ops/cpu/bert/rotary_embedding.cc``): inputs
``input`` (3-D ``[B, S, N·h]`` or 4-D ``[B, N, S, h]``), ``position_ids`` (int64 ``[B, S]`` or one
element), ``cos_cache``/``sin_cache`` ``[max_pos, rotary_dim/2]``; attributes ``interleaved`` and,
for a partial rotary, ``rotary_embedding_dim`` **with** ``num_heads`` (the kernel refuses one
without the other, in both layouts; a 3-D input with a narrow cache and neither is silently wrong,
so it is never emitted); dims past ``rotary_embedding_dim`` are copied through. The kernel does not
bounds-check positions: ``max_positions`` must cover the longest sequence the model will see
(default 4096, the dynamo exporter's sequence bound); a looked-up table is used as is.

Only on targets providing ``RotaryEmbedding`` (``com.microsoft``); elsewhere a near miss says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import ir

from ..framework.base import Pass, PassContext, PassResult
from ..framework.match import const_array
from ..framework.pattern import Match, PatternRule, absent_or
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter
from ..framework.rules import NoMatch, apply_rules
from ._rotary_layout import INT_MAX, array_ints, last_axis, slice_params, static_dim, value_rank
from ._rotary_tables import Table, TableEvaluator, position_ids, position_start

__all__ = ["FuseRotaryPass", "rotary_rules"]

_MS = "com.microsoft"
_REQUIRES = {_MS: ["RotaryEmbedding"]}
_SWAP = [0, 2, 1, 3]  # [B, S, N, h] <-> [B, N, S, h]


# ------------------------------------------------------------------------------------------------
# Patterns
# ------------------------------------------------------------------------------------------------


def _slice(op, x, name):
    """``x[a:b:c]`` along one axis (Slice's axes and steps are optional inputs); checked by name."""
    s, e = op.const(), op.const()
    return (op.Slice(x, s, e, op.const(), op.const(), _name=name) | op.Slice(x, s, e, op.const(), _name=name)
            | op.Slice(x, s, e, _name=name))


def _unsqueeze_last(op, v):
    """``Unsqueeze(v, -1)`` of a 4-D ``v`` (axes an input since opset 13, an attribute before)."""
    last = (-1, 4)
    return (op.Unsqueeze(v, op.const(predicate=lambda a: a.size == 1 and int(a.reshape(-1)[0]) in last))
            | op.Unsqueeze(v, axes=lambda a: a is not None and len(a) == 1 and int(a[0]) in last))


def rotary_half(op, x, cos, sin):
    rotated = op.Concat(op.Neg(_slice(op, x, "hi")), _slice(op, x, "lo"), _name="halves")
    return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))


def rotary_interleaved(op, x, cos, sin, flat_shape):
    pairs = op.Concat(_unsqueeze_last(op, op.Neg(_slice(op, x, "odd"))), _unsqueeze_last(op, _slice(op, x, "even")),
                      _name="pairs")
    # flatten(-2): to a given shape, or to Shape(pairs)[:-2] + [-1] (then that Shape is the rotation's too)
    dims = op.Shape(pairs, start=absent_or(0), end=lambda e: e is None)
    flat = op.Reshape(pairs, flat_shape) | op.Reshape(pairs, op.Concat(_slice(op, dims, "dims"), -1.0))
    return op.Add(op.Mul(x, cos), op.Mul(flat, sin))


def partial_rotary(op, x, pos, cos, sin):
    lo = _slice(op, x, "lo")
    heads_first = op.RotaryEmbedding(lo, pos, cos, sin, _domain=_MS, _name="rope")
    seq_first = op.Transpose(op.RotaryEmbedding(op.Transpose(lo, perm=_SWAP, _name="to_heads"), pos, cos, sin,
                                                _domain=_MS, _name="rope"), perm=_SWAP)
    return op.Concat(heads_first | seq_first, _slice(op, x, "rest"), _name="cat")


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------


def _rotation_width(m: Match) -> int | None | str:
    """The rotated width ``d`` the slices of ``x`` say (``None``: up to the tables), or why not."""
    bounds = {k: slice_params(m.node(k), 4) for k in ("hi", "lo", "odd", "even") if m.node(k) is not None}
    if any(b is None or b[0] != 3 for b in bounds.values()):
        return "the rotation slices x with non-constant bounds or not along the last axis"
    if m.node("halves") is not None:
        if not last_axis(m.node("halves"), 4):
            return "the halves are not joined along the last axis"
        (_, a, half, s1), (_, b, end, s2) = bounds["lo"], bounds["hi"]
        if a != 0 or s1 != 1 or s2 != 1 or b != half or half <= 0 or end < INT_MAX and end != 2 * half:
            return f"slices x[{a}:{half}] and x[{b}:{end}] are not the two halves"
        return 2 * half
    if not last_axis(m.node("pairs"), 5):
        return "the pairs are not stacked along a new last axis"
    (_, a, _, s1), (_, b, _, s2) = bounds["even"], bounds["odd"]
    if (a, b, s1, s2) != (0, 1, 2, 2):
        return "slices are not x[..., 0::2] and x[..., 1::2]"
    shape, dims = array_ints(m.flat_shape), m.node("dims")
    if shape is not None and (len(shape) != 4 or shape[-1] == 0):
        return f"the pairs are flattened to {shape}, not [.., h]"
    if dims is not None and (slice_params(dims, 1) or (0,))[:4] not in ((0, 0, -2, 1), (0, 0, 3, 1)):
        return "the pairs are flattened to a shape other than [.., h]"
    return None


def check_rotary(m: Match, ctx: PassContext) -> bool | str:
    """The rotation is of a 4-D float ``x``; cos and sin are rotary tables of the same positions."""
    if value_rank(m.x) != 4:
        return "the rotated tensor is not 4-D ([B, N, S, h] or [B, S, N, h])"
    if m.x.dtype is not None and m.x.dtype != ir.DataType.FLOAT:
        return f"RotaryEmbedding here runs float32, the input is {m.x.dtype}"
    width = _rotation_width(m)
    if isinstance(width, str):
        return width
    interleaved = m.node("pairs") is not None
    tables = m.rule.state.tables(m)
    cos, sin = tables.table(m.cos, "cos", interleaved), tables.table(m.sin, "sin", interleaved)
    for t in (cos, sin):
        if isinstance(t, str):
            return t
    assert isinstance(cos, Table) and isinstance(sin, Table)
    if cos.pos is not sin.pos:
        return "cos and sin are indexed by different positions"
    if cos.seq_axis != sin.seq_axis or cos.half.shape != sin.half.shape:
        return f"cos and sin tables differ in layout: {cos.half.shape} / {sin.half.shape}"
    d = 2 * cos.half.shape[1]
    if width is not None and width != d:
        return f"the rotation turns {width} dims, the tables hold {d}"
    if interleaved and min(slice_params(m.node(k), 4)[2] for k in ("even", "odd")) < d:  # type: ignore[index]
        return f"the interleaved slices stop short of the rotation's {d} dims"
    start = position_start(cos.pos)
    return start if isinstance(start, str) else True


def check_partial(m: Match, ctx: PassContext) -> bool | str:
    """``x[..., :r]`` rotated and ``x[..., r:]`` joined back, ``r`` the cache's rotary width."""
    rope, to_heads = m.node("rope"), m.node("to_heads")
    if value_rank(m.x) != 4:
        return "the partially rotated tensor is not 4-D"
    if not last_axis(m.node("cat"), 4):
        return "the rotated and passed parts are not joined along the last axis"
    lo, rest = slice_params(m.node("lo"), 4), slice_params(m.node("rest"), 4)
    if lo is None or rest is None or lo[0] != 3 or rest[0] != 3:
        return "the parts are not constant slices of the last axis"
    r, h = lo[2], static_dim(m.x, 3)
    to_end = rest[2] >= INT_MAX or h is None or rest[2] >= h
    if lo[1] != 0 or lo[3] != 1 or rest[1] != r or rest[3] != 1 or not to_end:
        return f"slices x[{lo[1]}:{lo[2]}] and x[{rest[1]}:{rest[2]}] do not split the head in two"
    cache = m.cos.shape if m.cos.shape is not None else getattr(const_array(m.cos), "shape", None)
    if cache is None or len(cache) != 2 or cache[1] != r // 2 or r % 2:
        return f"the rotary cache is not {r // 2} wide for a rotation of {r} dims"
    if rope.attr("rotary_embedding_dim", 0) not in (0, r):
        return "the rotary is already partial"
    if h is None or r >= h:
        return "the head size is unknown" if h is None else f"rotary of {r} dims of a head of {h}: not partial"
    heads = static_dim(m.x, 2 if to_heads is not None else 1)
    if heads is None:
        return "the head count of the partial rotary is not fixed by the graph (onnxruntime needs num_heads)"
    if m.x.dtype is not None and m.x.dtype != ir.DataType.FLOAT:
        return f"RotaryEmbedding here runs float32, the input is {m.x.dtype}"
    return True


# ------------------------------------------------------------------------------------------------
# Replacements
# ------------------------------------------------------------------------------------------------


def _rope(op, x, inputs, seq_first: bool, **attrs):
    """``RotaryEmbedding`` of a 4-D ``x``; a ``[B, S, N, h]`` one goes through the heads layout."""
    if not seq_first:
        return op.RotaryEmbedding(x, *inputs, _domain=_MS, **attrs)
    y = op.RotaryEmbedding(op.Transpose(x, perm=_SWAP), *inputs, _domain=_MS, **attrs)
    return op.Transpose(y, perm=_SWAP)


def fused_rotary(op, x, match):
    inputs, seq_axis = match.rule.state.shared
    return _rope(op, x, inputs, seq_axis == 1, interleaved=int(match.node("pairs") is not None))


def fused_partial(op, x, pos, cos, sin, match):
    rope, seq_first = match.node("rope"), match.node("to_heads") is not None
    attrs: dict[str, Any] = {"interleaved": int(rope.attr("interleaved", 0)),
                             "rotary_embedding_dim": int(slice_params(match.node("lo"), 4)[2]),  # type: ignore[index]
                             "num_heads": static_dim(x, 2 if seq_first else 1)}
    if rope.attr("scale") is not None:
        attrs["scale"] = float(rope.attr("scale"))
    return _rope(op, x, [pos, cos, sin], seq_first, **attrs)


@dataclass
class _RunState:
    """What the rotations of one pass run share: table evaluations, caches and position ids."""

    max_positions: int
    evaluator: TableEvaluator | None = None
    caches: dict[Any, tuple[ir.Value, ir.Value]] = field(default_factory=dict)
    positions: dict[int, tuple[ir.Value, ir.Value]] = field(default_factory=dict)
    shared: tuple[list[ir.Value], int] | None = None  # the inputs of the rotation being rewritten

    def tables(self, m: Match) -> TableEvaluator:
        if self.evaluator is None:
            self.evaluator = TableEvaluator(self.max_positions, m.opset(""))
        return self.evaluator

    def prepare(self, m: Match, rw: Rewriter) -> None:
        """Make (or reuse) the caches and position ids of ``m`` through ``rw``, for the replacement."""
        interleaved = m.node("pairs") is not None
        cos = self.tables(m).table(m.cos, "cos", interleaved)
        sin = self.tables(m).table(m.sin, "sin", interleaved)
        assert isinstance(cos, Table) and isinstance(sin, Table)
        graph = m.root.graph
        assert graph is not None
        key = (id(graph), cos.half.shape, cos.half.tobytes(), sin.half.tobytes())
        caches = self.caches.get(key)
        if caches is None or not all(_alive(v, graph) for v in caches):
            caches = (rw.constant(graph, cos.half, name="rotary_cos_cache"),
                      rw.constant(graph, sin.half, name="rotary_sin_cache"))
            self.caches[key] = caches
        got = self.positions.get(id(cos.pos))  # (pos, ids): pos kept alive, so its id stays its own
        if got is None or not _alive(got[1], graph):
            got = (cos.pos, position_ids(cos.pos, m.root, rw))
            self.positions[id(cos.pos)] = got
        self.shared = ([got[1], *caches], cos.seq_axis)


def _alive(v: ir.Value, graph: ir.Graph) -> bool:
    """``v`` is still in ``graph`` (a rolled-back rewrite may have removed what an earlier one made)."""
    if v.is_initializer():
        return graph.initializers.get(v.name) is v
    if v.is_graph_input():
        return True
    p = v.producer()
    return p is not None and p.graph is graph


class _RotaryRule(PatternRule):
    """The ``rotary`` rule: caches and position ids are made once per run, before the replacement."""

    def __init__(self, state: _RunState) -> None:
        super().__init__("rotary", [rotary_half, rotary_interleaved], fused_rotary, check=check_rotary,
                         requires=_REQUIRES, stat="fused RotaryEmbedding", replaces=())
        self.state = state

    def rewrite(self, match: Match, rw: Rewriter, ctx: PassContext) -> NoMatch | None:
        self.state.prepare(match, rw)
        return super().rewrite(match, rw, ctx)


def rotary_rules(max_positions: int = 4096) -> tuple[PatternRule, PatternRule]:
    """The ``rotary`` and ``partial-rotary`` rules for one pass run (they share its caches)."""
    return (_RotaryRule(_RunState(max_positions)),
            PatternRule("partial-rotary", partial_rotary, fused_partial, check=check_partial, requires=_REQUIRES,
                        stat="fused partial RotaryEmbedding"))


@register_pass
@dataclass(frozen=True)
class FuseRotaryPass(Pass):
    """Fuse rotary position embeddings (rotate-half or interleaved, full or partial) into ``RotaryEmbedding``.

    Attributes:
        max_positions: rows of the folded cos/sin caches for computed tables (the longest
            sequence, past included, the compiled model may see).
    """

    name: ClassVar[str] = "fuse-rotary"
    summary: ClassVar[str] = "fuse rotary position embeddings into com.microsoft RotaryEmbedding"

    max_positions: int = 4096

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Apply the rotary rules to a fixed point."""
        rw = Rewriter()
        apply_rules(model, rotary_rules(self.max_positions), ctx, rw, pass_name=self.name)
        return rw.result()
