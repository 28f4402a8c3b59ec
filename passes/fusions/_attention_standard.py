"""An attention layer in the fewest standard ONNX ops, for targets without ``com.microsoft`` attention.

Used by :mod:`passes.fusions.attention` once a layer is matched and checked (the same
:class:`~passes.fusions._attention_match.AttentionMatch` as for the contrib ops). Per layer::

    q, k, v = Split(x @ [Wq·s | Wk | Wv] + [bq·s | bk | bv])       # the scale s folded into Q
    Q = Transpose(Reshape(q, [0,0,N,d]), 0213)                      # [B,N,S,d]
    Kᵀ = Transpose(Reshape(k, [0,0,N,d]), 0231)                     # [B,N,d,S]: one Transpose
    V = Transpose(Reshape(v, [0,0,N,d]), 0213)
    y = Reshape(Transpose(Softmax(Q @ Kᵀ + bias) @ V, 0213), [0,0,N*d])

15 nodes (16 without a mask: no Add), plus ``Where(IsNaN(p), 0, p)`` when a query row can see
no key at all and the original guarded it. ``bias`` is made once per model from the 2-D mask
input (see :class:`StandardMasks`) and shared by every layer: no per-layer mask or shape
arithmetic is left. A score bias (ALiBi, a relative position bias, a sliding-window mask: the
graph's own values, which stay) is added to it, once per model where layers share it. Nothing
here depends on the opset beyond Trilu (14) for causal masks; the Split and Shape forms follow
the model's opset.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import ir

from ._attention_contrib import score_bias
from ._attention_match import AttentionMatch
from ..framework.rewriter import Rewriter

__all__ = ["StandardMasks", "standard_form_unsupported", "is_standard_form", "rewrite_standard"]


def is_standard_form(m: AttentionMatch) -> bool:
    """True when the layer already is what :func:`rewrite_standard` would write (a second run is a no-op).

    One packed projection split in three, each operand ``Transpose(Reshape(split output))`` in the
    layout MatMul reads, the scale already folded (1), at most one ``Add`` between the scores and
    the Softmax, and the merge ``Reshape(Transpose(context))``.
    """
    c = m.cand
    if abs(m.scale - 1.0) > 1e-6:
        return False
    split = c.q.nodes[0] if c.q.nodes else None
    if split is None or split.op_type != "Split" or not (c.k.nodes and c.k.nodes[0] is split
                                                         and c.v.nodes and c.v.nodes[0] is split):
        return False
    for operand, perm in ((c.scores_mm.inputs[0], [0, 2, 1, 3]), (c.scores_mm.inputs[1], [0, 2, 3, 1]),
                          (c.ctx_mm.inputs[1], [0, 2, 1, 3])):
        t = operand.producer() if operand is not None else None
        if t is None or t.op_type != "Transpose" or list(t.attr("perm") or []) != perm:
            return False
        r = t.inputs[0].producer() if t.inputs[0] is not None else None
        if r is None or r.op_type != "Reshape" or r.inputs[0] is None or r.inputs[0].producer() is not split:
            return False
    logits = c.softmax.inputs[0]
    add = logits.producer() if logits is not None else None
    if logits is not c.scores_mm.outputs[0] and not (
            add is not None and add.op_type == "Add" and add.inputs[0] is c.scores_mm.outputs[0]):
        return False
    reshape = m.output.producer()
    t = reshape.inputs[0].producer() if reshape is not None and reshape.inputs[0] is not None else None
    return (reshape is not None and reshape.op_type == "Reshape" and t is not None and t.op_type == "Transpose"
            and t.inputs[0] is c.ctx_mm.outputs[0])


def standard_form_unsupported(m: AttentionMatch, opset: int) -> str | None:
    """Why ``m`` cannot be written in standard ops by :func:`rewrite_standard`, or ``None``."""
    c = m.cand
    if is_standard_form(m):
        return "already in the standard-op form"
    if c.has_past or c.has_rotary or c.has_norm or m.group > 1:
        return ("the standard-op form covers self-attention without a KV cache, rotary, q/k norm or grouped "
                "K/V heads")
    if m.mask.causal and opset < 14:
        return f"a causal mask needs Trilu (opset 14); the model imports opset {opset}"
    if m.mask.mask_input is None and m.mask.causal and (c.x.shape is None or len(c.x.shape) != 3):
        return "a causal mask without a mask input needs a 3-D [batch, seq, hidden] input"
    return None


def _needs_nan_guard(m: AttentionMatch) -> bool:
    """True when a row can see no key, the mask blocks with -inf, and the original zeroed such rows.

    Rows with no allowed key exist under causal+padding (left padding) and where a score bias
    blocks a whole row (a sliding window over padding); a padding-only mask blocks a whole row
    only for an all-zero mask row, for which the finite bias gives the eager form's mean. The
    original guarded its rows when an ``IsNaN`` sits after its Softmax.
    """
    return ((m.mask.kind == "causal+padding" and _blocks_with_inf(m) or m.mask.bias_inf)
            and any(n.op_type == "IsNaN" for n in m.cand.nodes))


def _blocks_with_inf(m: AttentionMatch) -> bool:
    # -inf only where a row can be fully blocked: elsewhere finfo.min gives the same probabilities
    # (exp underflows to exactly 0) and never a NaN.
    return m.mask.kind == "causal+padding" and m.mask.blocks_with_inf


class StandardMasks:
    """The additive masks of one model, built once (on first use) and shared by all layers.

    * padding: ``Where(Reshape(Cast(mask→bool), [0,1,1,-1]), 0, neg)`` → ``[B,1,1,T]``;
    * causal: ``Trilu(ConstantOfShape([T,T], true))`` (lower triangle, no constant of a fixed
      size), with ``T`` read from the mask (or the input) shape;
    * causal+padding: the two boolean masks joined by ``And``, then one ``Where`` → ``[B,1,T,T]``.

    ``neg`` is ``-inf`` when the original blocks with ``-inf`` under causal+padding (its rows
    with no key are then NaN, or 0 behind its NaN guard, which the layer keeps), else the
    dtype's lowest finite value.
    """

    def __init__(self, graph: ir.Graph, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self._cache: dict[tuple[Any, ...], ir.Value] = {}
        self._terms: dict[tuple[Any, ...], ir.Value] = {}  # score biases, see score_bias

    def bias(self, m: AttentionMatch, rw: Rewriter, before: ir.Node, dtype: Any) -> ir.Value | None:
        """The additive bias for ``m``: its score bias plus its mask's, or ``None`` for neither.

        The score bias (:attr:`~passes.fusions._attention_mask.MaskVerdict.bias`) is the sum of
        the graph's own bias values, as is (Add broadcasts); one ``Add`` joins it to the mask's,
        once per pair, so a layer keeps one Add between its scores and its Softmax.
        """
        score = score_bias(m, rw, self.graph, self._terms, self.opset, op_layout=False)
        mask = self._mask(m, rw, before, dtype)
        if score is None or mask is None:
            return score if mask is None else mask
        key = (id(score), id(mask))
        if key not in self._cache:
            self._cache[key] = rw.make("Add", [score, mask], before=m.output.producer(),  # type: ignore[arg-type]
                                       name="attention_bias_and_mask").outputs[0]  # type: ignore[assignment]
        return self._cache[key]

    def _mask(self, m: AttentionMatch, rw: Rewriter, before: ir.Node, dtype: Any) -> ir.Value | None:
        """The additive bias for ``m``'s mask kind, or ``None`` for no mask."""
        kind = m.mask.kind
        if kind == "none":
            return None
        inf = _blocks_with_inf(m)
        src = m.mask.mask_input
        key = (kind, id(src) if src is not None else None, inf, np.dtype(dtype).str)
        if key in self._cache:
            return self._cache[key]
        g = self.graph
        if src is not None:
            before = next(iter(g))  # read from a graph input: first in the graph, ahead of every layer
        # else: from the first layer's input, before that layer (later layers come after it)

        def make(op: str, inputs: list[ir.Value | None], attrs: dict[str, Any] | None = None,
                 dt: ir.DataType | None = None, shape: Any = None) -> ir.Value:
            t = ir.TensorType(dt, shape) if dt is not None else None
            out = rw.make(op, inputs, attrs, before=before, name=f"attention_mask_{op.lower()}",
                          types=[t] if t is not None else None).outputs[0]
            assert out is not None
            return out

        allowed: ir.Value | None = None
        batch = src.shape[0] if src is not None and src.shape else None
        keys = src.shape[1] if src is not None and src.shape else None
        if src is not None and kind in ("padding", "causal+padding"):
            b = src if src.dtype == ir.DataType.BOOL else make(
                "Cast", [src], {"to": int(ir.DataType.BOOL)}, ir.DataType.BOOL, src.shape)
            shape = rw.constant(g, np.array([0, 1, 1, -1], np.int64), name="attention_mask_4d")
            allowed = make("Reshape", [b, shape], dt=ir.DataType.BOOL, shape=(batch, 1, 1, keys))
        if m.mask.causal:
            length = self._length(m, rw, make)
            square = make("Concat", [length, length], {"axis": 0}, ir.DataType.INT64, (2,))
            ones = make("ConstantOfShape", [square], {"value": ir.Tensor(np.array([True]))},
                        ir.DataType.BOOL, (keys, keys))
            tri = make("Trilu", [ones], {"upper": 0}, ir.DataType.BOOL, (keys, keys))
            allowed = tri if allowed is None else make(
                "And", [allowed, tri], dt=ir.DataType.BOOL, shape=(batch, 1, keys, keys))
        assert allowed is not None
        neg = -np.inf if inf else np.finfo(dtype).min
        zero = rw.constant(g, np.array(0, dtype), name="attention_mask_zero")
        low = rw.constant(g, np.array(neg, dtype), name="attention_mask_blocked")
        shape = (keys, keys) if kind == "causal" else (batch, 1, keys if m.mask.causal else 1, keys)
        out = make("Where", [allowed, zero, low], dt=ir.DataType.from_numpy(np.dtype(dtype)), shape=shape)
        self._cache[key] = out
        return out

    def _length(self, m: AttentionMatch, rw: Rewriter, make: Any) -> ir.Value:
        """``[T]``: the key count, from the mask input's shape (or the sequence axis of ``x``)."""
        src = m.mask.mask_input
        v = src if src is not None else m.cand.x
        if self.opset >= 15:
            return make("Shape", [v], {"start": 1, "end": 2}, ir.DataType.INT64, (1,))
        shape = make("Shape", [v], dt=ir.DataType.INT64)
        one = rw.constant(self.graph, np.array([1], np.int64), name="attention_axis1")
        return make("Gather", [shape, one], {"axis": 0}, ir.DataType.INT64, (1,))


def rewrite_standard(m: AttentionMatch, rw: Rewriter, graph: ir.Graph, masks: StandardMasks) -> ir.Value:
    """Build the standard-op layer for ``m`` before its head-merge node; returns the new output."""
    c = m.cand
    anchor = m.output.producer()
    assert anchor is not None
    n, d = m.num_heads, m.head_dim
    hidden = n * d
    dtype = c.x.dtype or ir.DataType.FLOAT
    np_dtype = dtype.numpy()
    (wq, bq), (wk, bk), (wv, bv) = (p.arrays() for p in (c.q, c.k, c.v))
    # The softmax scale on the Q columns: no runtime Mul (computed in float64, stored in the dtype).
    scale = np.float64(m.scale)
    wq = (wq.astype(np.float64) * scale).astype(wq.dtype)
    bq = (bq.astype(np.float64) * scale).astype(bq.dtype)
    bsz = c.x.shape[0] if c.x.shape and len(c.x.shape) == 3 else None
    seq = c.x.shape[1] if c.x.shape and len(c.x.shape) == 3 else None

    def make(op: str, inputs: list[ir.Value | None], attrs: dict[str, Any] | None = None,
             shape: Any = None, outputs: int = 1, name: str = "") -> ir.Node:
        types = [ir.TensorType(dtype, shape)] * outputs
        return rw.make(op, inputs, attrs, before=anchor, num_outputs=outputs, name=name or f"attention_{op.lower()}",
                       types=types)

    def const(a: np.ndarray, name: str) -> ir.Value:
        return rw.constant(graph, a, name=name)

    qkv = make("MatMul", [c.x, const(np.concatenate([wq, wk, wv], axis=1), "attention_qkv_weight")],
               shape=(bsz, seq, 3 * hidden), name="attention_qkv").outputs[0]
    bias = np.concatenate([bq, bk, bv])
    if np.any(bias != 0):
        qkv = make("Add", [qkv, const(bias, "attention_qkv_bias")], shape=(bsz, seq, 3 * hidden),
                   name="attention_qkv_bias").outputs[0]
    sizes = np.array([hidden] * 3, np.int64)
    opset = masks.opset
    if opset >= 13:
        split = make("Split", [qkv, const(sizes, "attention_qkv_split")], {"axis": -1}, (bsz, seq, hidden), 3,
                     name="attention_qkv_split")
    else:
        split = make("Split", [qkv], {"axis": -1, "split": [int(s) for s in sizes]}, (bsz, seq, hidden), 3,
                     name="attention_qkv_split")
    q, k, v = split.outputs
    heads = const(np.array([0, 0, n, d], np.int64), "attention_heads_shape")

    def to_heads(x: ir.Value | None, perm: list[int], shape: tuple[Any, ...], name: str) -> ir.Value:
        r = make("Reshape", [x, heads], shape=(bsz, seq, n, d), name=f"attention_{name}_heads").outputs[0]
        out = make("Transpose", [r], {"perm": perm}, shape, name=f"attention_{name}_transpose").outputs[0]
        assert out is not None
        return out

    qh = to_heads(q, [0, 2, 1, 3], (bsz, n, seq, d), "q")
    kt = to_heads(k, [0, 2, 3, 1], (bsz, n, d, seq), "k")
    vh = to_heads(v, [0, 2, 1, 3], (bsz, n, seq, d), "v")
    scores = make("MatMul", [qh, kt], shape=(bsz, n, seq, seq), name="attention_scores").outputs[0]
    mask = masks.bias(m, rw, anchor, np_dtype)
    if mask is not None:
        scores = make("Add", [scores, mask], shape=(bsz, n, seq, seq), name="attention_masked").outputs[0]
    probs = make("Softmax", [scores], {"axis": -1}, (bsz, n, seq, seq), name="attention_softmax").outputs[0]
    if _needs_nan_guard(m):
        isnan = rw.make("IsNaN", [probs], before=anchor, name="attention_isnan",
                        types=[ir.TensorType(ir.DataType.BOOL, (bsz, n, seq, seq))]).outputs[0]
        zero = const(np.array(0, np_dtype), "attention_zero")
        probs = make("Where", [isnan, zero, probs], shape=(bsz, n, seq, seq), name="attention_nan_guard").outputs[0]
    ctx = make("MatMul", [probs, vh], shape=(bsz, n, seq, d), name="attention_context").outputs[0]
    ctx = make("Transpose", [ctx], {"perm": [0, 2, 1, 3]}, (bsz, seq, n, d), name="attention_merge").outputs[0]
    if m.output_2d:
        merged = const(np.array([-1, hidden], np.int64), "attention_out_shape")
        return make("Reshape", [ctx, merged], shape=None, name="attention_out").outputs[0]  # type: ignore[return-value]
    merged = const(np.array([0, 0, hidden], np.int64), "attention_merged_shape")
    return make("Reshape", [ctx, merged], shape=(bsz, seq, hidden), name="attention_out").outputs[0]  # type: ignore[return-value]
