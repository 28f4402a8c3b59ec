"""An attention layer as onnxruntime's ``com.microsoft`` ``Attention`` or ``MultiHeadAttention``.

Used by :mod:`passes.fusions.attention` once a layer is matched and checked (see that module for
the forms and the onnxruntime contracts they follow). :class:`ContribAttention` holds what the
layers of one model share: the ``Cast(attention_mask → int32)`` made once per mask input, and
the ``attention_bias`` of a score bias (:attr:`~passes.fusions._attention_mask.MaskVerdict.bias`:
the graph's own bias values, summed and made 4-D only where needed, once per model for
layers that add the same values, e.g. T5's shared position bias).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import ir

from ._attention_match import MS, AttentionMatch, erase_layer
from ..framework.match import const_array
from ..framework.rewriter import Rewriter

__all__ = ["ContribAttention", "score_bias", "empty_rows"]


class ContribAttention:
    """Writes matched layers of ``model`` as contrib attention ops (one instance per pass run)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        #: ``id(mask input)`` -> its int32 ``mask_index``, shared by all layers.
        self.mask_casts: dict[int, ir.Value] = {}
        #: ids of the bias terms -> the ``attention_bias`` made from them, shared by all layers.
        self.biases: dict[tuple[Any, ...], ir.Value] = {}

    def attention(self, m: AttentionMatch, rw: Rewriter) -> None:
        """The layer as one ``Attention`` on ``x``, the packed ``[H, 3H]`` weights and the raw mask."""
        c = m.cand
        graph = self.model.graph
        ws, bs = zip(*(p.arrays() for p in (c.q, c.k, c.v)))
        weight = rw.constant(graph, np.concatenate(ws, axis=1), name="attention_qkv_weight")
        bias = rw.constant(graph, np.concatenate(bs), name="attention_qkv_bias")
        inputs: list[ir.Value | None] = [c.x, weight, bias]
        cast = self._mask_index(m, rw)
        if cast is not None:
            inputs.append(cast)
        attrs: dict[str, Any] = {"num_heads": m.num_heads}
        if m.mask.causal:
            attrs["unidirectional"] = 1
        if not math.isclose(m.scale, 1.0 / math.sqrt(m.head_dim), rel_tol=1e-5):
            attrs["scale"] = float(m.scale)
        anchor = m.output.producer()
        assert anchor is not None
        hidden = m.num_heads * m.head_dim
        att = rw.make("Attention", inputs, attrs, domain=MS, before=anchor, name="Attention",
                      types=[ir.TensorType(c.x.dtype or ir.DataType.FLOAT,
                                           (c.x.shape[0], c.x.shape[1], hidden) if c.x.shape and len(c.x.shape) == 3 else None)])
        out = att.outputs[0]
        if m.output_2d:
            shape = rw.constant(graph, np.array([-1, hidden], np.int64), name="attention_out_shape")
            out = rw.make("Reshape", [out, shape], before=anchor, name="attention_flatten",
                          types=[m.output.type]).outputs[0]
        rw.replace_all_uses_with(m.output, out)
        self._finish(m, rw, [m.output])

    def _mask_index(self, m: AttentionMatch, rw: Rewriter) -> ir.Value | None:
        """``Cast(attention_mask → int32)``, made once per mask input and shared by all layers."""
        mask_in = m.mask.mask_input
        if mask_in is None:
            return None
        cast = self.mask_casts.get(id(mask_in))
        if cast is None:
            first = next(iter(self.model.graph))
            cast = rw.make("Cast", [mask_in], {"to": int(ir.DataType.INT32)}, before=first,
                           name="attention_mask_index",
                           types=[ir.TensorType(ir.DataType.INT32, mask_in.shape)]).outputs[0]
            self.mask_casts[id(mask_in)] = cast
        return cast

    def attention_bias(self, m: AttentionMatch, rw: Rewriter) -> ir.Value | None:
        """The layer's score bias as a 4-D ``attention_bias`` (``None`` without one), shared by layers."""
        return score_bias(m, rw, self.model.graph, self.biases, self.model.opset("") or 17)

    def _finish(self, m: AttentionMatch, rw: Rewriter, old: list[ir.Value]) -> None:
        rw.import_opset(self.model, MS)
        erase_layer(m, rw, self.model, old)

    def multi_head_attention(self, m: AttentionMatch, rw: Rewriter, *, split_qkv: bool = False) -> None:
        """The layer as ``MultiHeadAttention`` on 3-D Q/K/V (see the module docs for the forms).

        ``split_qkv``: three projections ``x @ W + b`` instead of one packed MatMul and a Split (each
        then quantized or kept float on its own).
        """
        c = m.cand
        graph = self.model.graph
        anchor = m.output.producer()
        assert anchor is not None
        n, d, nkv, rep = m.num_heads, m.head_dim, m.kv_heads or m.num_heads, m.group
        past = c.has_past
        dtype = c.x.dtype or ir.DataType.FLOAT
        (wq, bq), (wk, bk), (wv, bv) = (p.arrays() for p in (c.q, c.k, c.v))
        expand_weights = rep > 1 and not past
        if expand_weights:  # repeat_kv on the weights: head j of K/V is kv head j // rep, exactly
            def heads(w: np.ndarray) -> np.ndarray:
                return np.repeat(w.reshape(*w.shape[:-1], nkv, d), rep, axis=-2).reshape(*w.shape[:-1], n * d)
            wk, bk, wv, bv = heads(wk), heads(bk), heads(wv), heads(bv)
        cols = [wq.shape[1], wk.shape[1], wv.shape[1]]

        def make(op: str, inputs: list[ir.Value | None], attrs: dict[str, Any] | None = None, domain: str = "",
                 outputs: int = 1, name: str = "") -> ir.Node:
            return rw.make(op, inputs, attrs, domain=domain, before=anchor, num_outputs=outputs, name=name or op)

        def const(a: np.ndarray, name: str) -> ir.Value:
            return rw.constant(graph, a, name=name)

        def project(w: np.ndarray, b: np.ndarray, name: str) -> ir.Value:
            y = make("MatMul", [c.x, const(w, f"attention_{name}_weight")], name=f"attention_{name}").outputs[0]
            if np.any(b != 0):
                y = make("Add", [y, const(b, f"attention_{name}_bias")], name=f"attention_{name}_bias").outputs[0]
            assert y is not None
            return y

        if split_qkv:
            q, k, v = project(wq, bq, "q"), project(wk, bk, "k"), project(wv, bv, "v")
        else:
            qkv = project(np.concatenate([wq, wk, wv], axis=1), np.concatenate([bq, bk, bv]), "qkv")
            q, k, v = make("Split", [qkv, const(np.array(cols, np.int64), "attention_qkv_split")], {"axis": -1},
                           outputs=3, name="attention_qkv_split").outputs
        assert q is not None and k is not None and v is not None
        rotated = {}
        for key, val in (("q", q), ("k", k)):
            heads_here = n if key == "q" or expand_weights else nkv
            norm = c.paths[key].norm
            if norm is not None:  # the q/k RMSNorm first, over each head or all columns as in the model
                w = const_array(norm.inputs[1])
                assert w is not None
                attrs = {"axis": -1, "epsilon": float(norm.attr("epsilon", 1e-5))}
                if w.size == d:
                    view = make("Reshape", [val, const(np.array([0, 0, heads_here, d], np.int64), "attention_heads")])
                    normed = make("SimplifiedLayerNormalization", [view.outputs[0], norm.inputs[1]], attrs).outputs[0]
                    val = make("Reshape", [normed, const(np.array([0, 0, heads_here * d], np.int64),
                                                         "attention_merged_heads")]).outputs[0]
                else:  # over the projection; K's weights repeated per head repeat its norm weight too
                    weight = norm.inputs[1] if w.size == heads_here * d else const(
                        np.repeat(w.reshape(nkv, d), rep, axis=0).reshape(-1), "attention_norm_weight")
                    val = make("SimplifiedLayerNormalization", [val, weight], attrs).outputs[0]
            rot = c.paths[key].rotary
            if rot is not None:  # the same rotation on the 3-D [B,S,heads*d] form: per head, per position
                attrs = {"interleaved": int(rot.attr("interleaved", 0))}
                if rot.attr("rotary_embedding_dim"):  # partial rotary on 3-D input needs the head count
                    attrs.update(rotary_embedding_dim=int(rot.attr("rotary_embedding_dim")), num_heads=heads_here)
                if rot.attr("scale") is not None:
                    attrs["scale"] = float(rot.attr("scale"))
                val = make("RotaryEmbedding", [val, *rot.inputs[1:4]], attrs, domain=MS).outputs[0]
            rotated[key] = val
        q, k = rotated["q"], rotated["k"]
        inputs: list[ir.Value | None] = [q, k, v, None, self._mask_index(m, rw)]
        old = [m.output]
        presents: list[tuple[ir.Value, int]] = []
        if past and rep > 1:
            # The cache keeps kv_heads heads (present = Concat(past, new)); the op gets them repeated.
            shape_kv = const(np.array([0, 0, nkv, d], np.int64), "attention_kv_heads_shape")
            shape_5d = const(np.array([0, 0, nkv, 1, d], np.int64), "attention_kv_group_shape")
            rep_new = const(np.array([1, 1, 1, rep, 1], np.int64), "attention_kv_repeat")
            rep_past = const(np.array([1, 1, rep, 1, 1], np.int64), "attention_past_repeat")
            ax2 = const(np.array([2], np.int64), "attention_axis2")
            merged = const(np.array([0, 0, n * d], np.int64), "attention_merged_shape")
            past_shape = const(np.array([0, n, -1, d], np.int64), "attention_past_shape")
            pasts = []
            for key in ("k", "v"):
                path = c.paths[key]
                new = k if key == "k" else v
                bnsh = make("Transpose", [make("Reshape", [new, shape_kv]).outputs[0]], {"perm": [0, 2, 1, 3]}).outputs[0]
                assert path.concat is not None and path.past is not None
                present = make("Concat", [path.past, bnsh], {"axis": 2}, name="attention_present").outputs[0]
                rw.replace_all_uses_with(path.concat.outputs[0], present)
                old.append(path.concat.outputs[0])
                grouped = make("Reshape", [new, shape_5d]).outputs[0]
                wide = make("Reshape", [make("Expand", [grouped, rep_new]).outputs[0], merged]).outputs[0]
                if key == "k":
                    k = wide
                else:
                    v = wide
                up = make("Unsqueeze", [path.past, ax2]).outputs[0]
                pasts.append(make("Reshape", [make("Expand", [up, rep_past]).outputs[0], past_shape]).outputs[0])
            inputs = [q, k, v, None, inputs[4], None, *pasts]
        elif past:
            inputs += [None, c.paths["k"].past, c.paths["v"].past]
            presents = [(c.paths["k"].concat.outputs[0], 1), (c.paths["v"].concat.outputs[0], 2)]  # type: ignore[union-attr]
        bias_4d = self.attention_bias(m, rw)
        if bias_4d is not None:
            inputs += [None] * (6 - len(inputs))
            inputs[5] = bias_4d
        while inputs and inputs[-1] is None:
            inputs.pop()
        attrs: dict[str, Any] = {"num_heads": n}
        if m.mask.causal:
            attrs["unidirectional"] = 1
        if not math.isclose(m.scale, 1.0 / math.sqrt(d), rel_tol=1e-5):
            attrs["scale"] = float(m.scale)
        shape3 = (c.x.shape[0], c.x.shape[1], n * d) if c.x.shape and len(c.x.shape) == 3 else None
        types: list[ir.Type | None] = [ir.TensorType(dtype, shape3)]
        names: list[str | None] = ["MultiHeadAttention"]
        if past:
            # onnxruntime 1.32 CPU reads past_key/past_value only when the present outputs exist
            # (without them the output is garbage), so they are always requested.
            types += [ov.type for ov, _ in presents] or [ir.TensorType(dtype, None)] * 2
            names += ["present_key", "present_value"]
        mha = rw.make("MultiHeadAttention", inputs, attrs, domain=MS, before=anchor, name="MultiHeadAttention",
                      output_names=names, types=types)
        out = mha.outputs[0]
        assert out is not None
        keep = empty_rows(m, self.biases)
        if keep is not None:
            out = make("Mul", [out, keep], name="attention_empty_rows").outputs[0]
        if m.output_2d:
            shape = const(np.array([-1, n * d], np.int64), "attention_out_shape")
            out = make("Reshape", [out, shape], name="attention_flatten").outputs[0]
        rw.replace_all_uses_with(m.output, out)
        for ov, i in presents:
            rw.replace_all_uses_with(ov, mha.outputs[i])  # type: ignore[arg-type]
            old.append(ov)
        self._finish(m, rw, old)


def score_bias(m: AttentionMatch, rw: Rewriter, graph: ir.Graph, cache: dict[tuple[Any, ...], ir.Value],
               opset: int, *, op_layout: bool = True) -> ir.Value | None:
    """The sum of ``m``'s score-bias terms; for the op (``op_layout``) 4-D, and rows with no key zeroed.

    A Where term becomes ``Where(cond, fill, 0)`` (or ``Where(cond, 0, fill)``). Made before
    ``m``'s head merge (every term is computed before its Softmax, and later layers come after),
    once per set of terms. See :func:`empty_rows` for the rows that see no key.
    """
    terms = m.mask.bias
    if not terms:
        return None
    _rebuild_shapes(m, rw, graph, cache, opset)
    clamp = op_layout and _guarded_empty_rows(m)
    key = (op_layout, clamp) + tuple((id(t.value), t.fill, t.blocked_when, t.heads) for t in terms)
    if key in cache:
        return cache[key]
    anchor = m.output.producer()
    assert anchor is not None
    dtype = m.cand.x.dtype or ir.DataType.FLOAT
    np_dtype = dtype.numpy()

    def make(op: str, inputs: list[ir.Value | None], attrs: dict[str, Any] | None = None) -> ir.Value:
        out = rw.make(op, inputs, attrs, before=anchor, name=f"attention_bias_{op.lower()}").outputs[0]
        assert out is not None
        return out

    def const(value: Any, name: str, dt: Any = np_dtype) -> ir.Value:
        return rw.constant(graph, np.array(value, dt), name=name)

    out: ir.Value | None = None
    for t in terms:
        part = t.value
        if t.fill is not None:
            fill, zero = const(t.fill, "attention_bias_fill"), const(0, "attention_bias_zero")
            part = make("Where", [t.value, fill, zero] if t.blocked_when else [t.value, zero, fill])
        if t.heads:  # added to [B·N, S|1, T] scores: [B·N, 1, S|1, T] -> [B, N, S|1, T]
            up = make("Unsqueeze", [part, const([1], "attention_bias_head_axis", np.int64)])
            part = make("Reshape", [up, const([-1, t.heads, 0, 0], "attention_bias_heads_shape", np.int64)])
        out = part if out is None else make("Add", [out, part])
    assert out is not None
    if op_layout and m.mask.bias_rank < 4:
        out = make("Unsqueeze", [out, const(np.arange(4 - m.mask.bias_rank), "attention_bias_axes", np.int64)])
    if op_layout and m.mask.bias_rows:  # [.., 1, T] -> [.., S, T]: the op reads one row per query
        if opset >= 15:
            seq = make("Shape", [m.cand.x], {"start": 1, "end": 2})
        else:
            seq = make("Gather", [make("Shape", [m.cand.x]), const([1], "attention_axis1", np.int64)], {"axis": 0})
        ones, one = const([1, 1], "attention_bias_ones", np.int64), const([1], "attention_bias_one", np.int64)
        out = make("Expand", [out, make("Concat", [ones, seq, one], {"axis": 0})])
    if clamp:  # [b, 1, S, T]: rows that are -inf at every key -> 0 (a mean, no NaN), and a 0/1 row scale
        if opset >= 18:
            top = make("ReduceMax", [out, const([-1], "attention_bias_keys", np.int64)], {"keepdims": 1})
        else:
            top = make("ReduceMax", [out], {"axes": [-1], "keepdims": 1})
        empty = make("IsInf", [top], {"detect_positive": 0})
        out = make("Where", [empty, const(0, "attention_bias_zero"), out])
        keep = make("Where", [empty, const(0, "attention_bias_zero"), const(1, "attention_bias_one_row")])
        cache[("rows",) + key] = make("Squeeze", [keep, const([1], "attention_bias_head_axis", np.int64)])
    cache[key] = out
    return out


def _rebuild_shapes(m: AttentionMatch, rw: Rewriter, graph: ir.Graph, cache: dict[tuple[Any, ...], ir.Value],
                    opset: int) -> None:
    """Size the bias by the layer input instead of the layer's heads (probed recipes, see
    :attr:`~passes.fusions._attention_mask.MaskVerdict.shape_reads`), so its projections can go."""
    x = m.cand.x
    for v, recipe in m.mask.shape_reads:
        node = v.producer()
        if ("shape", id(v)) in cache or node is None:
            continue
        parts = []
        for i, item in enumerate(recipe):
            if isinstance(item, int):
                part = rw.constant(graph, np.array([item], np.int64), name="attention_bias_dim")
            elif opset >= 15:
                axis = 0 if item == "b" else 1
                part = rw.make("Shape", [x], {"start": axis, "end": axis + 1}, before=node,
                               name="attention_bias_dim").outputs[0]
            else:
                full = rw.make("Shape", [x], before=node, name="attention_bias_dim").outputs[0]
                at = rw.constant(graph, np.array([0 if item == "b" else 1], np.int64), name="attention_bias_axis")
                part = rw.make("Gather", [full, at], {"axis": 0}, before=node, name="attention_bias_dim").outputs[0]
            parts.append(part)
        new = rw.make("Concat", parts, {"axis": 0}, before=node, name="attention_bias_shape",
                      types=[v.type]).outputs[0]
        assert new is not None
        rw.replace_all_uses_with(v, new)
        rw.erase_unused([node])
        cache[("shape", id(v))] = new


def _guarded_empty_rows(m: AttentionMatch) -> bool:
    """The bias blocks every key of some query row, and the original zeroes such rows (a NaN guard)."""
    return m.mask.bias_inf and any(n.op_type == "IsNaN" for n in m.cand.nodes)


def empty_rows(m: AttentionMatch, cache: dict[tuple[Any, ...], ir.Value]) -> ir.Value | None:
    """``[b, S, 1]``: 0 on query rows the bias blocks entirely, else 1; ``None`` when not needed.

    Such a row is NaN in the op (and NaN spreads through the next layer's values); behind the
    original's NaN guard it is 0. :func:`score_bias` sets the row to 0 (no NaN) and the layer's
    output is multiplied by this, which gives the guard's 0 exactly. Unguarded, the original is
    NaN there as the op is, and nothing is added. The bias has no head axis here (checked).
    """
    if not m.mask.bias or not _guarded_empty_rows(m):
        return None
    key = ("rows", True, True) + tuple((id(t.value), t.fill, t.blocked_when, t.heads) for t in m.mask.bias)
    return cache.get(key)
