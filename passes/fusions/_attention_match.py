"""The attention match: its data types and the syntactic half of matching (no evaluation here).

:func:`find_candidate` starts at a Softmax and follows the data flow loosely (which ops may sit on
each path: the patterns of :mod:`passes.fusions._attention_pattern`, on the framework's matcher) to
a :class:`Candidate`: the two MatMuls, the Q/K/V :class:`Projection` columns (a range, or read by
index arithmetic where Q/K/V are packed within each head: :mod:`passes.fusions._attention_columns`), each operand's
:class:`OperandPath` (rotary, KV-cache ``Concat``, GQA ``Expand``) and the head-merge chain. What those paths compute is checked by evaluation in
:mod:`passes.fusions._attention_check`, which turns a candidate into an :class:`AttentionMatch`;
the emitters (:mod:`passes.fusions._attention_contrib`, :mod:`passes.fusions._attention_standard`)
read only these types. :func:`erase_layer` removes what only a rewritten layer read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

import ir

from ._attention_columns import CUT_OPS, VIEW_OPS, role_columns
from ._attention_mask import MaskVerdict
from ._attention_pattern import MS, operand_path, path_nodes, projection, scores_matmuls, walk_layout
from ..framework.match import const_array, producer, scalar
from ..framework.rewriter import Rewriter

__all__ = ["MS", "Projection", "OperandPath", "Candidate", "AttentionMatch", "find_candidate", "fused_op",
           "erase_layer"]


@dataclass
class Projection:
    """``x @ weight[:, cols] + bias[cols]`` (columns of a possibly packed projection).

    ``cols`` is ``start:stop``, or the explicit ``columns`` when the role's columns are spread
    over a projection packed within each head (:mod:`passes.fusions._attention_columns`).
    """

    x: ir.Value
    weight: ir.Value
    bias: ir.Value | None
    trans_b: bool
    start: int
    stop: int
    nodes: list[ir.Node]
    columns: np.ndarray | None = None

    @property
    def width(self) -> int:
        """How many columns the role reads."""
        return int(self.columns.size) if self.columns is not None else self.stop - self.start

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``[K, width]`` weight columns and their bias (zeros when there is none)."""
        w = const_array(self.weight)
        assert w is not None
        if self.trans_b:
            w = w.T
        cols = self.columns if self.columns is not None else slice(self.start, self.stop)
        w = w[:, cols]
        b = const_array(self.bias) if self.bias is not None else None
        b = np.zeros(w.shape[1], w.dtype) if b is None else b.reshape(-1)[cols]
        return w, b.astype(w.dtype)


@dataclass
class OperandPath:
    """What sits between a projection and an attention MatMul operand, besides layout and scale.

    Walking back from the operand: an optional GQA head repeat (``Expand``), an optional KV-cache
    ``Concat(past, new)`` on the sequence axis, an optional ``RotaryEmbedding`` and an optional
    RMSNorm (``SimplifiedLayerNormalization`` over each head or the whole projection; Q and K).
    What the path computes is checked by evaluation, not trusted from this structure.
    """

    operand: ir.Value
    rotary: ir.Node | None = None
    concat: ir.Node | None = None
    repeat: ir.Node | None = None
    norm: ir.Node | None = None

    @property
    def past(self) -> ir.Value | None:
        return self.concat.inputs[0] if self.concat is not None else None

    def normed(self, y: np.ndarray, head_dim: int) -> np.ndarray | str:
        """``y`` (``[B, S, columns]``, float64) through the path's RMSNorm, or why it cannot be.

        Over each head when the norm weight has ``head_dim`` entries (Qwen3), over all the
        columns when it has as many (OLMo-2).
        """
        assert self.norm is not None
        w = const_array(self.norm.inputs[1])
        shape = y.shape
        if w is None or w.size not in (head_dim, shape[-1]):
            return (f"norm {self.norm.label()} has a weight of {None if w is None else w.size} entries, neither the "
                    f"head size {head_dim} nor the projection's {shape[-1]} columns")
        y = y.reshape(*shape[:-1], -1, w.size)
        eps = float(self.norm.attr("epsilon", 1e-5))
        y = y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + eps) * w.astype(np.float64)
        return y.reshape(shape)


@dataclass
class Candidate:
    """A Softmax whose surroundings look like attention, before the numeric checks."""

    softmax: ir.Node
    scores_mm: ir.Node
    ctx_mm: ir.Node
    q: Projection
    k: Projection
    v: Projection
    head_chain: list[ir.Node]
    merge_chain: list[ir.Value]  # ctx_mm output, then each Reshape/Transpose output after it
    nodes: list[ir.Node] = field(default_factory=list)
    paths: dict[str, OperandPath] = field(default_factory=dict)  # "q", "k", "v"

    @property
    def x(self) -> ir.Value:
        return self.q.x

    @property
    def has_past(self) -> bool:
        return any(p.concat is not None for p in self.paths.values())

    @property
    def has_rotary(self) -> bool:
        return any(p.rotary is not None for p in self.paths.values())

    @property
    def has_norm(self) -> bool:
        return any(p.norm is not None for p in self.paths.values())


@dataclass
class AttentionMatch:
    """A checked attention layer, ready to rewrite."""

    cand: Candidate
    num_heads: int
    head_dim: int
    scale: float
    mask: MaskVerdict
    output: ir.Value  # the head-merge value the fused node replaces
    output_2d: bool  # the head merge is [B*S, H] rather than [B, S, H]
    kv_heads: int = 0  # heads of the K/V projections (< num_heads for grouped-query attention)

    @property
    def group(self) -> int:
        return self.num_heads // (self.kv_heads or self.num_heads)


def _softmax_axis_ok(node: ir.Node, opset: int) -> bool:
    axis = node.attr("axis", -1 if opset >= 13 else 1)
    return axis in (-1, 3)


def _operand(v: ir.Value) -> tuple[ir.Value, list[ir.Node], OperandPath]:
    """The operand path of ``v`` (see :func:`passes.fusions._attention_pattern.operand_path`)."""
    m = operand_path(v)
    return m.src, path_nodes(m), OperandPath(v, m.node("rotary"), m.node("concat"), m.node("repeat"), m.node("norm"))


def _head_blocks(p: ir.Node) -> tuple[tuple[str, Any], ir.Node] | None:
    """A Slice or Gather of whole blocks of a packed projection viewed as ``[B, S, G, ...]``.

    The block axis is the first one the view splits the hidden axis into (2, however written:
    ``-2`` of 4 dims, ``-3`` of 5); a block is the product of the dims after it. Falcon's
    multi-query layout: ``qkv.view(B, S, heads + 2, d)``, then ``[..., :-2, :]`` (the query
    heads), ``[..., [-2], :]`` (the key) and ``[..., [-1], :]`` (the value); ModernBERT's
    ``qkv.view(B, S, 3, heads, d).unbind(2)`` from the dynamo exporter: a ``[i:i+1]`` Slice of
    axis 2 each. Returns the column segment ``("slice", (start, stop))`` and the Reshape, or
    ``None`` for another form.
    """
    if p.op_type not in ("Slice", "Gather") or not p.inputs or p.inputs[0] is None:
        return None
    reshape = producer(p.inputs[0], "Reshape")
    out, inp = p.inputs[0].shape, reshape.inputs[0].shape if reshape is not None else None
    if reshape is None or out is None or inp is None or len(out) < 4 or len(inp) != 3:
        return None
    groups, hidden = out[2], inp[2]
    block = int(np.prod(out[3:])) if all(isinstance(x, int) for x in out[3:]) else None
    if not isinstance(groups, int) or block is None or not isinstance(hidden, int) or groups * block != hidden:
        return None
    if p.op_type == "Gather":
        idx = const_array(p.inputs[1])
        if p.attr("axis", 0) not in (2, 2 - len(out)) or idx is None or idx.size != 1:
            return None
        i = int(idx.reshape(-1)[0]) % groups
        return ("slice", (i * block, (i + 1) * block)), reshape
    starts, ends = const_array(p.inputs[1]), const_array(p.inputs[2])
    axes = const_array(p.inputs[3]) if len(p.inputs) > 3 and p.inputs[3] is not None else None
    steps = const_array(p.inputs[4]) if len(p.inputs) > 4 and p.inputs[4] is not None else None
    if starts is None or ends is None or axes is None or starts.size != 1 or int(axes.reshape(-1)[0]) not in (
            2, 2 - len(out)):
        return None
    if steps is not None and int(steps.reshape(-1)[0]) != 1:
        return None
    lo, hi = (int(a.reshape(-1)[0]) for a in (starts, ends))
    lo, hi = (max(0, min(groups, x + groups if x < 0 else x)) for x in (lo, hi))
    return ("slice", (lo * block, hi * block)), reshape


def _packed(src: ir.Value) -> Projection | str | None:
    """``src`` cut (Split/Slice/Gather[ND]) from a view of ``x @ W + b``: its columns by index arithmetic.

    GPT-NeoX's ``[B,S,N,3d]`` and CodeGen's ``[B,S,mp,3L]`` pack Q/K/V within each head or group
    (see :mod:`passes.fusions._attention_columns`). ``None`` when ``src`` is not cut behind a
    view (a cut of the projection output itself is a column range, read by :func:`_projection`).
    """
    cut = src.producer()
    if cut is None or cut.op_type not in CUT_OPS or cut.domain or not cut.inputs or cut.inputs[0] is None:
        return None
    view: list[ir.Node] = []
    base = cut.inputs[0]
    while (p := base.producer()) is not None and p.op_type in VIEW_OPS and not p.domain and p.inputs[0] is not None:
        view.append(p)
        base = p.inputs[0]
    if not view:
        return None
    m = projection(base)
    if isinstance(m, str):
        return None
    gemm = m.node("gemm")
    weight, bias = (m.gemm_weight, m.gemm_bias) if gemm is not None else (m.weight, m.bias)
    trans_b = bool(m.trans_b) if gemm is not None else False
    w = const_array(weight)
    assert w is not None
    cols = role_columns(src, view[::-1] + [cut], w.shape[0] if trans_b else w.shape[1])
    if isinstance(cols, str):
        return cols
    nodes = [cut, *view, *m.chain("reshapes")]
    linear = (gemm, m.node("flat")) if gemm is not None else (m.node("bias_add"), m.node("mm"))
    nodes += [n for n in linear if n is not None]
    proj = _finish_projection(m.x, weight, bias, trans_b, None, nodes)
    if isinstance(proj, Projection) and not np.array_equal(cols, np.arange(cols[0], cols[0] + cols.size)):
        proj.columns = cols
    elif isinstance(proj, Projection):
        proj.start, proj.stop = int(cols[0]), int(cols[0]) + cols.size
    return proj


def _projection(src: ir.Value) -> Projection | str:
    """Resolve ``src`` as (a column slice of) ``x @ W + b``: packed within heads, else a column range."""
    packed = _packed(src)
    if isinstance(packed, Projection):
        return packed
    segment = _segment_projection(src)
    # A view the index arithmetic could not read says why, rather than the column-range reading.
    return packed if isinstance(segment, str) and isinstance(packed, str) else segment


def _segment_projection(src: ir.Value) -> Projection | str:
    """``src`` as a column range of ``x @ W + b``: a Split/Slice of the hidden axis or of whole heads."""
    nodes: list[ir.Node] = []
    seg: tuple[str, Any] | None = None
    p = src.producer()
    blocks = _head_blocks(p) if p is not None else None
    if blocks is not None:
        seg, reshape = blocks
        nodes += [p, reshape]  # type: ignore[list-item]
        src = reshape.inputs[0]
    elif p is not None and p.op_type == "Split":
        axis = p.attr("axis", 0)
        sizes = const_array(p.inputs[1]) if len(p.inputs) > 1 and p.inputs[1] is not None else None
        if sizes is None and p.attr("split") is not None:
            sizes = np.array(p.attr("split"))
        if axis in (-1, 2):
            seg = ("split", (None if sizes is None else [int(s) for s in sizes], src.index(), len(p.outputs)))
            nodes.append(p)
            src = p.inputs[0]
        else:
            # A packed projection viewed as [B, S, 3, heads, d] (ModernBERT's unbind) splits the
            # "3" axis: take equal column blocks; the layout probe checks what the operand holds.
            if sizes is not None and len(set(int(s) for s in sizes.reshape(-1))) > 1:
                return f"{p.label()} splits axis {axis} in unequal parts, not the hidden axis"
            seg = ("split", (None, src.index(), len(p.outputs)))
            nodes.append(p)
            src, chain = walk_layout(p.inputs[0])
            nodes += chain
            if not chain:
                return f"{p.label()} splits axis {axis}, not the hidden axis"
    elif p is not None and p.op_type == "Slice":
        starts, ends = const_array(p.inputs[1]), const_array(p.inputs[2])
        axes = const_array(p.inputs[3]) if len(p.inputs) > 3 and p.inputs[3] is not None else None
        steps = const_array(p.inputs[4]) if len(p.inputs) > 4 and p.inputs[4] is not None else None
        if starts is None or ends is None or starts.size != 1 or axes is None or int(axes.reshape(-1)[0]) not in (-1, 2):
            return f"{p.label()} is not a constant slice of the hidden axis"
        if steps is not None and int(steps.reshape(-1)[0]) != 1:
            return f"{p.label()} has a step"
        seg = ("slice", (int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])))
        nodes.append(p)
        src = p.inputs[0]
    m = projection(src)
    if isinstance(m, str):
        return m
    nodes += m.chain("reshapes")
    gemm = m.node("gemm")
    if gemm is not None:
        nodes += [gemm, m.node("flat")]
        return _finish_projection(m.x, m.gemm_weight, m.gemm_bias, bool(m.trans_b), seg, nodes)
    if m.node("bias_add") is not None:
        nodes.append(m.node("bias_add"))
    nodes.append(m.node("mm"))
    return _finish_projection(m.x, m.weight, m.bias, False, seg, nodes)


def _finish_projection(
    x: ir.Value, weight: ir.Value, bias: ir.Value | None, trans_b: bool, seg: tuple[str, Any] | None,
    nodes: list[ir.Node],
) -> Projection | str:
    w = const_array(weight)
    assert w is not None
    cols = w.shape[0] if trans_b else w.shape[1]
    start, stop = 0, cols
    if seg is not None and seg[0] == "split":
        sizes, idx, n = seg[1]
        if sizes is None:
            if cols % n:
                return f"the packed projection of {cols} columns does not split in {n}"
            sizes = [cols // n] * n
        if sum(sizes) != cols:
            return f"split sizes {sizes} do not cover the {cols} projection columns"
        start = sum(sizes[:idx])
        stop = start + sizes[idx]
    elif seg is not None:
        s, e = seg[1]
        start = max(0, min(cols, s + cols if s < 0 else s))
        stop = max(0, min(cols, e + cols if e < 0 else e))
    return _checked_bias(Projection(x, weight, bias, trans_b, start, stop, nodes), cols)


def _checked_bias(proj: Projection, cols: int) -> Projection | str:
    if proj.bias is not None:
        b = const_array(proj.bias)
        if b is None or b.size != cols:
            return f"bias %{proj.bias.name} does not match the {cols} projection columns"
    return proj


def find_candidate(sm: ir.Node, opset: int) -> Candidate | str:
    """Match the skeleton around a Softmax, or say what is missing."""
    if not _softmax_axis_ok(sm, opset):
        return f"Softmax axis {sm.attr('axis')} is not the last axis"
    logits = sm.inputs[0]
    nodes = [sm]
    p = sm.outputs[0]
    reshapes = 0
    while True:
        if p.is_graph_output():
            return "the attention probabilities are a graph output"
        users = p.consumers()
        if len(users) == 1 and users[0].op_type == "Cast" and users[0].attr("to") == (p.dtype or 1):
            nodes.append(users[0])
            p = users[0].outputs[0]
            continue
        if len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}:
            isnan = next(u for u in users if u.op_type == "IsNaN")
            where = next(u for u in users if u.op_type == "Where")
            if where.inputs[0] is isnan.outputs[0] and where.inputs[2] is p and scalar(where.inputs[1]) == 0.0:
                nodes += [isnan, where]
                p = where.outputs[0]
                continue
        if len(users) == 1 and users[0].op_type == "Reshape" and users[0].inputs[0] is p and reshapes < 2:
            # Bloom: probabilities [B, N, S, T] viewed back as [B·N, S, T] for a batched MatMul
            # (checked by evaluation to be that view: the context is probed in the same layout).
            reshapes += 1
            nodes.append(users[0])
            p = users[0].outputs[0]
            continue
        break
    users = p.consumers()
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].inputs[0] is not p:
        fed = ", ".join(u.label() for u in users[:3]) or "nothing"
        return f"the Softmax output feeds {fed}, not one MatMul with the values"
    ctx_mm = users[0]
    reason = "no MatMul of query and key projections feeds the Softmax"
    for mm in scores_matmuls(logits):
        qsrc, qchain, qpath = _operand(mm.inputs[0])
        ksrc, kchain, kpath = _operand(mm.inputs[1])
        qp, kp = _projection(qsrc), _projection(ksrc)
        if isinstance(qp, str) or isinstance(kp, str):
            reason = f"scores {mm.label()}: " + (qp if isinstance(qp, str) else kp)  # type: ignore[operator]
            continue
        vsrc, vchain, vpath = _operand(ctx_mm.inputs[1])
        vp = _projection(vsrc)
        if isinstance(vp, str):
            return f"values of {ctx_mm.label()}: {vp}"
        if not (qp.x is kp.x is vp.x):
            return "query, key and value project different inputs (cross attention is not fused)"
        chain = [ctx_mm.outputs[0]]
        v = chain[0]
        while not v.is_graph_output():
            us = [u for u in v.consumers() if u.op_type != "Shape"]
            if len(us) == 1 and us[0].op_type in ("Reshape", "Transpose") and us[0].inputs[0] is v:
                v = us[0].outputs[0]
                chain.append(v)
            else:
                break
        if len(chain) < 2:
            return f"the output of {ctx_mm.label()} is not merged back to [B,S,H] by Transpose/Reshape"
        if qpath.concat is not None or qpath.repeat is not None or vpath.rotary is not None or vpath.norm is not None:
            return "the query path concatenates or repeats heads, or the values are rotated or normed"
        if (kpath.concat is None) != (vpath.concat is None):
            return "only one of key and value is concatenated with a past"
        return Candidate(sm, mm, ctx_mm, qp, kp, vp, qchain + kchain + vchain, chain,
                          nodes + [mm, ctx_mm] + qchain + kchain + vchain,
                          {"q": qpath, "k": kpath, "v": vpath})
    return reason


def fused_op(m: AttentionMatch) -> str:
    """``Attention`` (packed QKV, raw mask) when it expresses the layer, else ``MultiHeadAttention``."""
    if m.cand.has_past or m.cand.has_rotary or m.cand.has_norm or m.group > 1:
        return "MultiHeadAttention"
    return "Attention"


def erase_layer(m: AttentionMatch, rw: Rewriter, model: ir.Model, old: list[ir.Value]) -> None:
    """Erase what only the replaced values ``old`` of layer ``m`` read, and its unused weights.

    dead-flow would too; this keeps one pass useful alone.
    """
    c = m.cand
    graph = model.graph
    cone: dict[int, ir.Node] = {}
    for v in old:
        cone.update((id(n), n) for n in _cone_nodes(v, stop={id(c.x)}))
    rw.erase_unused(reversed([n for n in graph if id(n) in cone]))
    for p in (c.q, c.k, c.v):
        for v in (p.weight, p.bias):
            if v is not None and v.is_initializer() and not v.has_uses() and not v.is_graph_output():
                rw.remove_initializer(graph, v.name)


def _cone_nodes(v: ir.Value, stop: set[int]) -> list[ir.Node]:
    """Nodes ``v`` depends on, back to ``stop`` values and graph inputs, in graph order."""
    seen: dict[int, ir.Node] = {}
    stack = [v]
    visited: set[int] = set()
    while stack:
        x = stack.pop()
        if id(x) in visited or id(x) in stop:
            continue
        visited.add(id(x))
        p = x.producer()
        if p is None or id(p) in seen:
            continue
        seen[id(p)] = p
        stack.extend(i for i in p.inputs if i is not None)
    graph = v.graph
    return [n for n in graph if id(n) in seen] if graph is not None else []

