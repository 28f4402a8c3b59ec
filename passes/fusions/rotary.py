"""fuse-rotary: rotary position embeddings → onnxruntime's ``com.microsoft::RotaryEmbedding``.

Patterns (``x`` is Q or K in the ``[B, N, S, h]`` layout, ``h`` the head size)::

    rotate-half:  y = x * cos + Concat(Neg(x[..., h/2:]), x[..., :h/2]) * sin
    interleaved:  y = x * cos + Reshape(Concat(Unsqueeze(Neg(x[..., 1::2]), -1),
                                               Unsqueeze(x[..., 0::2], -1), axis=-1), [.., h]) * sin

The two products and both operands of each may come in any order. ``cos``/``sin`` are
``[1|B, 1, S, h]`` tables of the positions, recognised in two forms (alternatives of one rule):

* computed (Llama in both exporters): ``Unsqueeze([Cast][Mul(·, scale)] Cos(E), 1)`` with
  ``E = Concat(f, f)`` (rotate-half) or ``E`` = ``f`` repeated element-wise (interleaved), and
  ``f = Cast(pos → float) * inv_freq`` (``inv_freq`` a 1-D constant). The pass folds
  ``cos(p · inv_freq)·scale`` for ``p = 0 .. max_positions-1`` into an initializer;
* looked up: ``Unsqueeze(Gather(table[P, h], pos), 1)`` with a constant table whose two halves
  (or even/odd columns, interleaved) are equal; the half-table becomes the cache.

``pos`` is traced back to ``start + arange(S)`` (``Range(start, ·, 1)``, through ``Add`` of a
scalar offset, ``Unsqueeze``, ``Expand`` and integer ``Cast``): the op then gets that start
(``0``, or the past length read off the graph) as a 1-element ``position_ids``, which
onnxruntime reads as "positions ``start + s``". A 2-D ``[B, S]`` int64 positions graph input is
passed through unchanged.

Runtime contract (onnxruntime 1.32 CPU): inputs ``input`` (3-D ``[B,S,hidden]`` or 4-D
``[B,N,S,h]``), ``position_ids`` (int64 ``[B,S]`` or one element), ``cos_cache``/``sin_cache``
``[max_pos, rotary_dim/2]``; attribute ``interleaved``. The kernel does not bounds-check positions:
``max_positions`` must cover the longest sequence the model will see (default 4096, the dynamo
exporter's sequence bound), or the table of a looked-up form is used as is.

Only on targets providing ``RotaryEmbedding`` (``com.microsoft``); elsewhere a near miss says so.
Partial rotary (``rotary_dim < h``) is not matched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

import ir

from ..framework.base import Pass, PassContext, PassResult
from ..framework.match import const_array, operands, producer, scalar
from ..framework.rules import NoMatch, Rule, apply_rules
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter

__all__ = ["FuseRotaryPass", "RotaryFusion"]

_MS = "com.microsoft"
_INT_MAX = 2**62  # Slice "to the end" bounds are INT64_MAX; anything this large means the same.


@dataclass
class _Table:
    """Where a cos or sin table comes from: its half-table data for positions 0..P-1."""

    kind: str  # "cos" or "sin"
    half: np.ndarray  # [P, h/2] float32
    pos: ir.Value  # the integer positions the table is indexed by
    nodes: list[ir.Node]


@dataclass
class _Rotary:
    root: ir.Node
    x: ir.Value
    interleaved: bool
    cos: np.ndarray
    sin: np.ndarray
    pos: ir.Value
    nodes: list[ir.Node]


# ------------------------------------------------------------------------------------------------
# The rotated operand: rotate_half(x) or its interleaved form
# ------------------------------------------------------------------------------------------------


def _rank(v: ir.Value) -> int | None:
    if v.shape is not None:
        return len(v.shape)
    p = v.producer()
    if p is not None and p.op_type == "Transpose" and p.attr("perm") is not None:
        return len(p.attr("perm"))
    return None


def _slice_params(node: ir.Node, x: ir.Value) -> tuple[int, int, int] | None:
    """``(start, end, step)`` of a Slice of ``x`` along its last axis, else ``None``."""
    if node.op_type != "Slice" or node.inputs[0] is not x or len(node.inputs) < 3:
        return None
    starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    rank = _rank(x)
    if axes is None:
        if rank != 1:
            return None
    else:
        if axes.size != 1:
            return None
        axis = int(axes.reshape(-1)[0])
        if not (axis == -1 or (rank is not None and axis == rank - 1)):
            return None
    step = 1 if steps is None else int(steps.reshape(-1)[0]) if steps.size == 1 else 0
    return int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), step


def _last_axis(node: ir.Node, value: ir.Value | None = None) -> bool:
    axis = node.attr("axis", 0)
    rank = _rank(value) if value is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _rotate_half(rot: ir.Value) -> tuple[ir.Value, int, list[ir.Node]] | NoMatch:
    """``rot = Concat(Neg(x[..., h/2:]), x[..., :h/2])``: ``(x, h/2, nodes)``."""
    cat = producer(rot, "Concat")
    if cat is None or len(cat.inputs) != 2 or not _last_axis(cat, rot):
        return NoMatch("not a Concat of two halves")
    neg = producer(cat.inputs[0], "Neg")
    lo = producer(cat.inputs[1], "Slice")
    if neg is None or lo is None:
        return NoMatch("the Concat is not (Neg(second half), first half)")
    hi = producer(neg.inputs[0], "Slice")
    if hi is None or hi.inputs[0] is not lo.inputs[0] or lo.inputs[0] is None:
        return NoMatch("the two halves are not slices of one tensor")
    x = lo.inputs[0]
    a, b = _slice_params(lo, x), _slice_params(hi, x)
    if a is None or b is None:
        return NoMatch("half slices with non-constant bounds or not on the last axis", near=True)
    half = a[1]
    if a[0] != 0 or a[2] != 1 or b[0] != half or b[2] != 1 or half <= 0:
        return NoMatch(f"slices {a} and {b} are not the two halves", near=True)
    h = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None
    if b[1] < _INT_MAX and b[1] != 2 * half:
        return NoMatch("the second half does not end at the head size", near=True)
    if h is not None and h != 2 * half:
        return NoMatch(f"partial rotary (rotary dim {2 * half} of head size {h}) is not fused", near=True)
    return x, half, [cat, neg, lo, hi]


def _rotate_interleaved(rot: ir.Value) -> tuple[ir.Value, int, list[ir.Node]] | NoMatch:
    """``rot = flatten(stack(-x[..., 1::2], x[..., 0::2]))``: ``(x, h/2, nodes)``."""
    rs = producer(rot, "Reshape")
    if rs is None:
        return NoMatch("not a Reshape")
    cat = producer(rs.inputs[0], "Concat")
    if cat is None or len(cat.inputs) != 2 or cat.attr("axis", 0) != -1:
        return NoMatch("not a flattened stack")
    u0, u1 = producer(cat.inputs[0], "Unsqueeze"), producer(cat.inputs[1], "Unsqueeze")
    if u0 is None or u1 is None:
        return NoMatch("not a stack of two unsqueezed tensors")
    for u in (u0, u1):
        axes = const_array(u.inputs[1]) if len(u.inputs) > 1 else np.array(u.attr("axes", []))
        if axes is None or axes.reshape(-1).tolist() != [-1]:
            return NoMatch("stack not along a new last axis")
    neg = producer(u0.inputs[0], "Neg")
    even = producer(u1.inputs[0], "Slice")
    if neg is None or even is None:
        return NoMatch("the stack is not (Neg(odd), even)")
    odd = producer(neg.inputs[0], "Slice")
    x = even.inputs[0]
    if odd is None or x is None or odd.inputs[0] is not x:
        return NoMatch("odd and even elements are not slices of one tensor")
    a, b = _slice_params(even, x), _slice_params(odd, x)
    if a is None or b is None or a[0] != 0 or b[0] != 1 or a[2] != 2 or b[2] != 2:
        return NoMatch("slices are not x[..., 0::2] and x[..., 1::2]", near=True)
    shape = const_array(rs.inputs[1])
    h = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None
    if h is None and shape is not None and shape.size and int(shape.reshape(-1)[-1]) > 0:
        h = int(shape.reshape(-1)[-1])
    if h is None or h % 2:
        return NoMatch("the head size of the interleaved rotation is unknown", near=True)
    if a[1] < h or b[1] < h:
        return NoMatch("partial interleaved rotary is not fused", near=True)
    return x, h // 2, [rs, cat, u0, u1, neg, even, odd]


# ------------------------------------------------------------------------------------------------
# The cos/sin tables
# ------------------------------------------------------------------------------------------------


def _unsqueezed_axes(node: ir.Node) -> list[int] | None:
    arr = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if arr is None:
        attr = node.attr("axes")
        return list(attr) if attr is not None else None
    return [int(a) for a in arr.reshape(-1)]


def _is_float_cast(node: ir.Node) -> bool:
    return node.op_type == "Cast" and node.attr("to") == 1


def _duplicated(e: ir.Value, interleaved: bool) -> tuple[ir.Value, list[ir.Node]] | None:
    """``e = Concat(f, f)`` (rotate-half) or ``f`` repeated element-wise (interleaved): ``f``."""
    if not interleaved:
        cat = producer(e, "Concat")
        if cat is not None and len(cat.inputs) == 2 and cat.inputs[0] is cat.inputs[1] and _last_axis(cat, e):
            return cat.inputs[0], [cat]  # type: ignore[return-value]
        return None
    rs = producer(e, "Reshape")
    cat = producer(rs.inputs[0], "Concat") if rs is not None else None
    if cat is None or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1] or cat.attr("axis", 0) != -1:
        return None
    u = producer(cat.inputs[0], "Unsqueeze")
    if u is None or _unsqueezed_axes(u) != [-1]:
        return None
    return u.inputs[0], [rs, cat, u]  # type: ignore[return-value]


def _table(v: ir.Value, kind: str, half: int, interleaved: bool, max_positions: int) -> _Table | NoMatch:
    """The half-table of positions 0..P-1 behind a ``[1|B, 1, S, h]`` cos or sin operand."""
    nodes: list[ir.Node] = []
    u = producer(v, "Unsqueeze")
    if u is None or _unsqueezed_axes(u) != [1]:
        return NoMatch(f"{kind} is not unsqueezed over the heads axis", near=True)
    nodes.append(u)
    t = u.inputs[0]
    scale = 1.0
    # Trailing no-op casts and an attention-scaling multiply (TorchScript keeps Mul(·, 1.0)).
    while True:
        p = producer(t)
        if p is None:
            break
        if _is_float_cast(p):
            nodes.append(p)
            t = p.inputs[0]
            continue
        if p.op_type == "Mul":
            for a, c in operands(p):
                s = scalar(c)
                if s is not None:
                    scale *= s
                    nodes.append(p)
                    t = a
                    break
            else:
                break
            continue
        break
    op = "Cos" if kind == "cos" else "Sin"
    trig = producer(t, op)
    if trig is not None:
        nodes.append(trig)
        dup = _duplicated(trig.inputs[0], interleaved)  # type: ignore[arg-type]
        if dup is None:
            form = "element-wise repeated" if interleaved else "Concat(f, f)"
            return NoMatch(f"{op} argument is not {form}", near=True)
        f, dn = dup
        nodes += dn
        mul = producer(f, "Mul")
        if mul is None:
            return NoMatch(f"{op} frequencies are not positions * inv_freq", near=True)
        for a, b in operands(mul):
            inv = const_array(b)
            cast = producer(a, "Cast")
            if inv is None or cast is None or not _is_float_cast(cast):
                continue
            inv = inv.astype(np.float32).reshape(-1)
            if inv.size != half:
                return NoMatch(f"inv_freq has {inv.size} entries, the rotation {half}", near=True)
            positions = np.arange(max_positions, dtype=np.float32)
            freqs = positions[:, None] * inv[None, :]
            data = (np.cos(freqs) if kind == "cos" else np.sin(freqs)).astype(np.float32)
            if scale != 1.0:
                data = (data * np.float32(scale)).astype(np.float32)
            return _Table(kind, data, cast.inputs[0], [*nodes, mul, cast])  # type: ignore[arg-type]
        return NoMatch(f"{op} frequencies are not Cast(positions) * constant inv_freq", near=True)
    g = producer(t, "Gather")
    table = const_array(g.inputs[0]) if g is not None else None
    if g is None or table is None or g.attr("axis", 0) != 0 or table.ndim != 2 or table.shape[1] != 2 * half:
        return NoMatch(f"{kind} is neither {op}(positions * inv_freq) nor a lookup in a constant table", near=True)
    table = table.astype(np.float32) * np.float32(scale)
    lo, hi = (table[:, 0::2], table[:, 1::2]) if interleaved else (table[:, :half], table[:, half:])
    if not np.array_equal(lo, hi):
        return NoMatch(f"the {kind} table's halves differ: not a rotary table", near=True)
    return _Table(kind, np.ascontiguousarray(lo), g.inputs[1], [*nodes, g])  # type: ignore[arg-type]


def _position_start(pos: ir.Value) -> tuple[list[ir.Value | int], ir.Value | None] | NoMatch:
    """``pos = start + arange(S)`` broadcast: the terms of ``start``, or a ``[B,S]`` graph input.

    Returns ``(terms, None)`` with constant ints and scalar values whose sum is the start, or
    ``([], value)`` for a 2-D int64 positions graph input.
    """
    if pos.is_graph_input():
        if pos.dtype == ir.DataType.INT64 and pos.shape is not None and len(pos.shape) == 2:
            return [], pos
        return NoMatch(f"positions input {pos.name!r} is not int64 [B, S]", near=True)
    terms: list[ir.Value | int] = []
    v: ir.Value | None = pos
    for _ in range(16):
        p = producer(v)
        if p is None:
            break
        if p.op_type in ("Unsqueeze", "Expand", "Identity") or (p.op_type == "Cast" and p.attr("to") in (6, 7)):
            v = p.inputs[0]
            continue
        if p.op_type == "Add":
            for a, b in operands(p):
                if producer(a, "Range", "Unsqueeze", "Expand", "Add") is not None and _scalar_like(b):
                    c = scalar(b)
                    terms.append(int(c) if c is not None else b)  # type: ignore[arg-type]
                    v = a
                    break
            else:
                return NoMatch("positions are added to a non-scalar offset", near=True)
            continue
        if p.op_type == "Range":
            step = scalar(p.inputs[2])
            if step != 1:
                return NoMatch("positions Range step is not 1", near=True)
            c = scalar(p.inputs[0])
            terms.append(int(c) if c is not None else p.inputs[0])  # type: ignore[arg-type]
            return terms, None
        break
    return NoMatch("positions are not start + Range(S) (nor a [B, S] positions input)", near=True)


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
        i is None or _scalar_like(i) or i.producer() is not None and i.producer().op_type == "Shape"  # type: ignore[union-attr]
        for i in p.inputs[1:]
    )


# ------------------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RotaryFusion(Rule):
    """``x*cos + rotate(x)*sin`` (rotate-half or interleaved) → ``com.microsoft::RotaryEmbedding``.

    Caches and position ids are shared by all the rotations of one run (memo dicts, built per
    pass run, so no state survives between runs).
    """

    max_positions: int = 4096
    caches: dict[Any, tuple[ir.Value, ir.Value]] = field(default_factory=dict, compare=False)
    positions: dict[int, ir.Value] = field(default_factory=dict, compare=False)

    name: ClassVar[str] = "rotary"
    roots: ClassVar[tuple[str, ...]] = ("Add",)
    stat: ClassVar[str] = "fused RotaryEmbedding"

    def check(self, node: ir.Node, ctx: PassContext) -> _Rotary | NoMatch:
        failure: NoMatch = NoMatch("not x*cos + rotate(x)*sin")
        for pc, ps in operands(node):
            m1, m2 = producer(pc, "Mul"), producer(ps, "Mul")
            if m1 is None or m2 is None or m1 is m2:
                continue
            for rot, sin in operands(m2):
                for interleaved in (False, True):
                    found = _rotate_interleaved(rot) if interleaved else _rotate_half(rot)  # type: ignore[arg-type]
                    if isinstance(found, NoMatch):
                        failure = found if found.near else failure
                        continue
                    x, half, rot_nodes = found
                    cos = next((c for a, c in operands(m1) if a is x), None)
                    if cos is None:
                        failure = NoMatch("the cos product does not read the rotated tensor", near=True)
                        continue
                    m = self._finish(node, x, half, interleaved, cos, sin, [m1, m2, *rot_nodes], ctx)  # type: ignore[arg-type]
                    if isinstance(m, NoMatch):
                        failure = m
                        continue
                    return m
        return failure

    def _finish(self, node: ir.Node, x: ir.Value, half: int, interleaved: bool, cos: ir.Value, sin: ir.Value,
                nodes: list[ir.Node], ctx: PassContext) -> _Rotary | NoMatch:
        if _rank(x) != 4:
            return NoMatch("the rotated tensor is not [B, N, S, h]", near=True)
        if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
            return NoMatch(f"RotaryEmbedding here runs float32, the input is {x.dtype}", near=True)
        tc = _table(cos, "cos", half, interleaved, self.max_positions)
        if isinstance(tc, NoMatch):
            return tc
        ts = _table(sin, "sin", half, interleaved, self.max_positions)
        if isinstance(ts, NoMatch):
            return ts
        if tc.pos is not ts.pos:
            return NoMatch("cos and sin are indexed by different positions", near=True)
        start = _position_start(tc.pos)
        if isinstance(start, NoMatch):
            return start
        if ctx.target is None or not ctx.target.supports("RotaryEmbedding", _MS):
            return NoMatch("the target does not provide com.microsoft RotaryEmbedding", near=True)
        return _Rotary(node, x, interleaved, tc.half, ts.half, tc.pos, nodes)

    # -- rewrite -------------------------------------------------------------------------------
    def _position_ids(self, pos: ir.Value, before: ir.Node, rw: Rewriter) -> ir.Value:
        got = self.positions.get(id(pos))
        if got is not None:
            return got
        start = _position_start(pos)
        assert not isinstance(start, NoMatch)
        terms, direct = start
        g = before.graph
        assert g is not None
        if direct is not None:
            value = direct
        else:
            const = sum(t for t in terms if isinstance(t, int))
            dyn = [t for t in terms if not isinstance(t, int)]
            value = None
            for t in dyn:
                if t.dtype != ir.DataType.INT64:
                    t = rw.make("Cast", [t], {"to": 7}, before=before, name="rotary_pos_cast").outputs[0]  # type: ignore[assignment]
                value = t if value is None else rw.make("Add", [value, t], before=before, name="rotary_pos").outputs[0]
            if value is None or const:
                c = rw.constant(g, np.array([const], dtype=np.int64), name="rotary_position_start")
                value = c if value is None else rw.make("Add", [value, c], before=before, name="rotary_pos").outputs[0]
        assert value is not None
        self.positions[id(pos)] = value
        return value

    def _caches(self, m: _Rotary, graph: ir.Graph, rw: Rewriter) -> tuple[ir.Value, ir.Value]:
        key = (m.cos.shape, m.cos.tobytes(), m.sin.tobytes())
        got = self.caches.get(key)
        if got is None:
            got = (rw.constant(graph, m.cos, name="rotary_cos_cache"), rw.constant(graph, m.sin, name="rotary_sin_cache"))
            self.caches[key] = got
        return got

    def rewrite(self, match: _Rotary, rw: Rewriter, ctx: PassContext) -> None:
        root = match.root
        out = root.outputs[0]
        assert out is not None and root.graph is not None
        pos_ids = self._position_ids(match.pos, root, rw)
        cos, sin = self._caches(match, root.graph, rw)
        new = rw.make("RotaryEmbedding", [match.x, pos_ids, cos, sin], {"interleaved": int(match.interleaved)},
                      domain=_MS, before=root, name="RotaryEmbedding", types=[out.type])
        rw.replace_all_uses_with(out, new.outputs[0])
        rw.erase(root)
        rw.erase_unused(match.nodes)


@register_pass
@dataclass(frozen=True)
class FuseRotaryPass(Pass):
    """Fuse rotary position embeddings (rotate-half or interleaved) into ``RotaryEmbedding``.

    Attributes:
        max_positions: rows of the folded cos/sin caches for computed tables (the longest
            sequence, past included, the compiled model may see).
    """

    name: ClassVar[str] = "fuse-rotary"
    summary: ClassVar[str] = "fuse rotary position embeddings into com.microsoft RotaryEmbedding"

    max_positions: int = 4096

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Apply the rotary rule to a fixed point."""
        rw = Rewriter()
        rule = RotaryFusion(max_positions=self.max_positions)
        if apply_rules(model, [rule], ctx, rw, pass_name=self.name):
            rw.import_opset(model, _MS)
        return rw.result()
