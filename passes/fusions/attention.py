"""fuse-attention: multi-head self-attention → onnxruntime's ``com.microsoft::Attention``.

The match is anchored at the Softmax and follows the data flow, never names::

    x ─► MatMul(W)+b ─► [Split/Slice] ─► reshape/transpose/scale ─► Q', K'ᵀ, V'
    scores = MatMul(Q', K'ᵀ) ─► mask and scale (any form) ─► Softmax(axis=-1)
    ─► [Cast] [Where(IsNaN(p), 0, p)] ─► MatMul(p, V') ─► Transpose/Reshape ─► y [B,S,H]

Syntax is matched only loosely (which ops may sit on each path); what the paths compute is
*checked by evaluation* in onnxruntime on probe inputs (:mod:`passes.fusions._attention_probe`):

* each of Q', K', V' must equal ``c · heads(x @ W + b)`` in the layout ``MatMul`` needs
  (``[B,N,S,d]``, ``[B,N,d,S]``, ``[B,N,S,d]``), which also gives ``num_heads`` and ``head_dim``
  and the pre-MatMul scales ``c``;
* the head merge must equal ``transpose(0,2,1,3) + reshape``;
* the mask region must be a key-padding and/or causal mask of a 2-D mask input
  (:mod:`passes.fusions._attention_mask`), which also gives the post-MatMul scale.

Decoder paths may also hold, from the operand back (:func:`_walk_path`): a GQA head repeat
(``Unsqueeze/Expand/Reshape``), a KV cache ``Concat(past, new)`` on the sequence axis, and a
``com.microsoft::RotaryEmbedding`` (so ``fuse-rotary`` runs first in the pipelines). The checks
then feed a random past and random rotary outputs and require K', V' to equal
``repeat_kv(concat(past, new))``, the rotary inputs to be the projection heads, and the mask to be
causal over ``past + S`` (offset by the past) and/or key padding over the total length.

On a target with ``com.microsoft::Attention`` the layer becomes one Attention node reading ``x``,
the concatenated ``[H, 3H]`` weights and ``[3H]`` bias, and ``Cast(attention_mask → int32)`` as a
raw 2-D ``mask_index`` (shared by all layers); ``unidirectional=1`` for causal masks; ``scale``
only when it differs from ``1/sqrt(head_dim)``.

Layers with a rotary, a past or grouped K/V heads become ``MultiHeadAttention`` (onnxruntime
1.32 CPU contract, checked numerically): ``q, k, v = Split(x @ [Wq|Wk|Wv] + b)`` as 3-D
``[B,S,heads*d]``, ``RotaryEmbedding`` on the 3-D Q and K (same positions and caches), the int32
``[B,T]`` mask as ``key_padding_mask``, ``unidirectional=1``, and

* no past, GQA: the K/V weight columns repeated to ``num_heads`` (exact: ``repeat_kv`` copies heads);
* past, no GQA (GPT-2): ``past_key/past_value`` inputs (BNSH); the op's ``present_key/value``
  replace the exporter's ``Concat`` and keep its graph-output names;
* past and GQA (Llama): the cache keeps ``kv_heads`` heads, so ``present = Concat(past,
  BNSH(k_rot))`` is kept and the op gets K/V and the pasts repeated (``Expand``).

Not ``GroupQueryAttention``: it takes per-row lengths (``seqlens_k``), not a key padding mask, so
by its contract it cannot express left padding or holes, and right-padded rows are unspecified.
Nor MultiHeadAttention's 4-D BNSH key form: its causal mask then ignores the past. Its present
outputs are always requested: 1.32 CPU ignores ``past_key`` without them. Query rows that see no
key at all (left padding under a causal mask) are not reproduced: the original yields 0 (sdpa's
NaN guard) or a mean, the op a mean.

On targets without contrib attention (the ``onnx`` target), a matched layer without a past,
rotary or grouped heads is rewritten in the fewest standard ops instead
(:mod:`passes.fusions._attention_standard`): one packed QKV MatMul with the scale folded into the Q
columns, one Split, Reshape/Transpose per operand, ``Softmax(Q·Kᵀ + bias)·V``, Transpose and
Reshape, with the additive ``bias`` built once per model from the 2-D mask. Other layers there
are left as they are, with a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

import ir

from ._attention_mask import MaskRun, MaskVerdict, classify_mask, padding_patterns
from ._attention_probe import Probe, ProbeError, input_feeds
from ._attention_standard import StandardMasks, rewrite_standard, standard_form_unsupported
from ..framework.base import Pass, PassContext, PassResult
from ..framework.match import const_array, producer, scalar
from ..framework.rules import NoMatch, Rule, apply_rules
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter

__all__ = ["FuseAttentionPass", "AttentionFusion"]

_MS = "com.microsoft"
# Ops that only move data between the projections and the attention MatMuls.
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Cast"})
# Ops that may sit between the scores MatMul and the Softmax (scaling and masking).
_MASK_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast"})
# Probe sizes (batch, sequence): distinct from each other and from typical head counts.
_PROBE_SIZES = ((2, 7), (3, 5), (1, 6))
# Past (KV-cache) lengths of those probes, for layers that concatenate a cache.
_PROBE_PAST = (4, 3, 0)


# ------------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------------


@dataclass
class _Projection:
    """``x @ weight[:, start:stop] + bias[start:stop]`` (columns of a possibly packed projection)."""

    x: ir.Value
    weight: ir.Value
    bias: ir.Value | None
    trans_b: bool
    start: int
    stop: int
    nodes: list[ir.Node]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        w = const_array(self.weight)
        assert w is not None
        if self.trans_b:
            w = w.T
        w = w[:, self.start : self.stop]
        b = const_array(self.bias) if self.bias is not None else None
        b = np.zeros(w.shape[1], w.dtype) if b is None else b.reshape(-1)[self.start : self.stop]
        return w, b.astype(w.dtype)


@dataclass
class _Path:
    """What sits between a projection and an attention MatMul operand, besides layout and scale.

    Walking back from the operand: an optional GQA head repeat (``Expand``), an optional KV-cache
    ``Concat(past, new)`` on the sequence axis, an optional ``RotaryEmbedding`` (Q and K). What
    the path computes is checked by evaluation, not trusted from this structure.
    """

    operand: ir.Value
    rotary: ir.Node | None = None
    concat: ir.Node | None = None
    repeat: ir.Node | None = None

    @property
    def past(self) -> ir.Value | None:
        return self.concat.inputs[0] if self.concat is not None else None


@dataclass
class _Candidate:
    """A Softmax whose surroundings look like attention, before the numeric checks."""

    softmax: ir.Node
    scores_mm: ir.Node
    ctx_mm: ir.Node
    q: _Projection
    k: _Projection
    v: _Projection
    head_chain: list[ir.Node]
    merge_chain: list[ir.Value]  # ctx_mm output, then each Reshape/Transpose output after it
    nodes: list[ir.Node] = field(default_factory=list)
    paths: dict[str, _Path] = field(default_factory=dict)  # "q", "k", "v"

    @property
    def x(self) -> ir.Value:
        return self.q.x

    @property
    def has_past(self) -> bool:
        return any(p.concat is not None for p in self.paths.values())

    @property
    def has_rotary(self) -> bool:
        return any(p.rotary is not None for p in self.paths.values())


@dataclass
class AttentionMatch:
    """A checked attention layer, ready to rewrite."""

    cand: _Candidate
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


def _walk_layout(v: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """Follow reshape/transpose/scalar-scale producers back to the value they rearrange."""
    nodes = []
    while True:
        p = v.producer()
        if p is None or p.domain not in ("", "ai.onnx"):
            break
        if p.op_type in _LAYOUT_OPS:
            nodes.append(p)
            v = p.inputs[0]
            continue
        if p.op_type in ("Mul", "Div") and len(p.inputs) == 2:
            a, b = p.inputs
            if scalar(b) is not None:
                nodes.append(p)
                v = a
                continue
            if p.op_type == "Mul" and scalar(a) is not None:
                nodes.append(p)
                v = b
                continue
        break
    return v, nodes


def _walk_path(v: ir.Value) -> tuple[ir.Value, list[ir.Node], _Path]:
    """Like :func:`_walk_layout`, also through a GQA ``Expand``, a KV-cache ``Concat`` and a rotary.

    Order (from the operand back): layout/scale, [Expand], layout, [Concat(past, ·)], layout,
    [RotaryEmbedding], layout, projection. Anything out of that order ends the walk.
    """
    path = _Path(v)
    nodes: list[ir.Node] = []
    stage = 0  # 0: may still see Expand; 1: Concat; 2: RotaryEmbedding; 3: only layout
    while True:
        v, chain = _walk_layout(v)
        nodes += chain
        p = v.producer()
        if p is None:
            break
        if (p.domain == _MS and p.op_type == "RotaryEmbedding" and stage <= 2
                and all(a in ("interleaved",) or not p.attr(a) for a in p.attributes)):
            # Only the attributes the 3-D rewrite can copy (scale, partial rotary: not fused).
            path.rotary, stage = p, 3
        elif p.domain not in ("", "ai.onnx"):
            break
        elif p.op_type == "Expand" and stage == 0:
            path.repeat, stage = p, 1
        elif p.op_type == "Concat" and len(p.inputs) == 2 and stage <= 1 and p.attr("axis") in (2, -2):
            path.concat, stage = p, 2
            nodes.append(p)
            v = p.inputs[1]  # type: ignore[assignment]
            continue
        else:
            break
        nodes.append(p)
        v = p.inputs[0]  # type: ignore[assignment]
    return v, nodes, path


def _skip_reshapes(v: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    while (p := producer(v, "Reshape", "Flatten", "Identity")) is not None:
        nodes.append(p)
        v = p.inputs[0]
    return v


def _projection(src: ir.Value) -> _Projection | str:
    """Resolve ``src`` as (a column slice of) ``x @ W + b``."""
    nodes: list[ir.Node] = []
    seg: tuple[str, Any] | None = None
    p = src.producer()
    if p is not None and p.op_type == "Split":
        axis = p.attr("axis", 0)
        if axis not in (-1, 2):
            return f"{p.label()} splits axis {axis}, not the hidden axis"
        sizes = const_array(p.inputs[1]) if len(p.inputs) > 1 and p.inputs[1] is not None else None
        if sizes is None and p.attr("split") is not None:
            sizes = np.array(p.attr("split"))
        seg = ("split", (None if sizes is None else [int(s) for s in sizes], src.index(), len(p.outputs)))
        nodes.append(p)
        src = p.inputs[0]
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
    base = _skip_reshapes(src, nodes)
    p = base.producer()
    if p is None:
        return f"%{src.name} is not computed by a projection"
    mm, bias, trans_b = None, None, False
    if p.op_type == "Add":
        for a, b in ((p.inputs[0], p.inputs[1]), (p.inputs[1], p.inputs[0])):
            arr = const_array(b)
            if producer(a, "MatMul") is not None and arr is not None and arr.ndim <= 1:
                mm, bias = a.producer(), b
                break
        if mm is None:
            return f"{p.label()} is not a projection bias add"
        nodes.append(p)
    elif p.op_type == "MatMul":
        mm = p
    elif p.op_type == "Gemm":
        if p.attr("alpha", 1.0) != 1.0 or p.attr("beta", 1.0) != 1.0 or p.attr("transA", 0):
            return f"{p.label()} scales or transposes its input"
        w = const_array(p.inputs[1])
        if w is None or w.ndim != 2:
            return f"{p.label()} has no constant weight"
        if len(p.inputs) > 2 and p.inputs[2] is not None:
            b = const_array(p.inputs[2])
            if b is None or b.ndim > 1:
                return f"{p.label()} has no constant 1-D bias"
            bias = p.inputs[2]
        trans_b = bool(p.attr("transB", 0))
        nodes.append(p)
        flat = p.inputs[0]
        reshape = producer(flat, "Reshape", "Flatten")
        if reshape is None:
            return f"{p.label()} reads a 2-D input that is not a flattened [B,S,H] tensor"
        nodes.append(reshape)
        x = reshape.inputs[0]
        return _finish_projection(x, p.inputs[1], bias, trans_b, seg, nodes)
    else:
        return f"%{src.name} comes from {p.label()}, not from a MatMul projection"
    nodes.append(mm)
    w = const_array(mm.inputs[1])
    if w is None or w.ndim != 2:
        return f"{mm.label()} has no constant 2-D weight"
    return _finish_projection(mm.inputs[0], mm.inputs[1], bias, False, seg, nodes)


def _finish_projection(
    x: ir.Value, weight: ir.Value, bias: ir.Value | None, trans_b: bool, seg: tuple[str, Any] | None,
    nodes: list[ir.Node],
) -> _Projection | str:
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
    if bias is not None:
        b = const_array(bias)
        if b is None or b.size != cols:
            return f"bias %{bias.name} does not match the {cols} projection columns"
    return _Projection(x, weight, bias, trans_b, start, stop, nodes)


def _structure(sm: ir.Node, opset: int) -> _Candidate | str:
    """Match the skeleton around a Softmax, or say what is missing."""
    if not _softmax_axis_ok(sm, opset):
        return f"Softmax axis {sm.attr('axis')} is not the last axis"
    logits = sm.inputs[0]
    nodes = [sm]
    p = sm.outputs[0]
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
        break
    users = p.consumers()
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].inputs[0] is not p:
        return "the Softmax output does not feed one MatMul with the values"
    ctx_mm = users[0]
    # The scores MatMul: back from the Softmax through scale and mask ops.
    frontier, seen, found = [logits], set(), []
    for _ in range(8):
        nxt = []
        for v in frontier:
            q = v.producer() if v is not None else None
            if q is None or id(q) in seen:
                continue
            seen.add(id(q))
            if q.op_type == "MatMul":
                found.append(q)
            elif q.op_type in _MASK_OPS:
                nxt.extend(x for x in q.inputs if x is not None and const_array(x) is None)
        frontier = nxt
    reason = "no MatMul of query and key projections feeds the Softmax"
    for mm in found:
        qsrc, qchain, qpath = _walk_path(mm.inputs[0])
        ksrc, kchain, kpath = _walk_path(mm.inputs[1])
        qp, kp = _projection(qsrc), _projection(ksrc)
        if isinstance(qp, str) or isinstance(kp, str):
            reason = f"scores {mm.label()}: " + (qp if isinstance(qp, str) else kp)  # type: ignore[operator]
            continue
        vsrc, vchain, vpath = _walk_path(ctx_mm.inputs[1])
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
        if qpath.concat is not None or qpath.repeat is not None or vpath.rotary is not None:
            return "the query path concatenates or repeats heads, or the values are rotated"
        if (kpath.concat is None) != (vpath.concat is None):
            return "only one of key and value is concatenated with a past"
        return _Candidate(sm, mm, ctx_mm, qp, kp, vp, qchain + kchain + vchain, chain,
                          nodes + [mm, ctx_mm] + qchain + kchain + vchain,
                          {"q": qpath, "k": kpath, "v": vpath})
    return reason


# ------------------------------------------------------------------------------------------------
# Numeric checks
# ------------------------------------------------------------------------------------------------


def _ratio(got: np.ndarray, ref: np.ndarray) -> float | None:
    """``c`` with ``got == c * ref`` (to float tolerance), else ``None``."""
    if got.shape != ref.shape:
        return None
    g, r = got.astype(np.float64), ref.astype(np.float64)
    denom = float((r * r).sum())
    if denom == 0.0:
        return None
    c = float((g * r).sum() / denom)
    if np.max(np.abs(g - c * r)) <= 1e-4 * (1.0 + np.max(np.abs(c * r))):
        return c
    return None


def _graph_input_dims(model: ir.Model) -> tuple[int | None, int | None]:
    """Static batch and sequence sizes when a 2-D graph input fixes them."""
    b = s = None
    for v in model.graph.inputs:
        shape = v.shape
        if shape and len(shape) == 2:
            if isinstance(shape[0], int):
                b = shape[0]
            if isinstance(shape[1], int):
                s = shape[1]
    return b, s


class _Analysis:
    """Per-run checks of all candidate Softmax nodes of the main graph (the pass keeps no state)."""

    def __init__(self, model: ir.Model, ctx: PassContext) -> None:
        self.model = model
        self.results: dict[int, AttentionMatch | NoMatch] = {}
        self.mask_casts: dict[int, ir.Value] = {}
        opset = model.opset("") or 17
        cands: list[_Candidate] = []
        for node in model.graph:
            if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
                continue
            c = _structure(node, opset)
            if isinstance(c, str):
                self.results[id(node)] = NoMatch(c, near=True)
            else:
                cands.append(c)
        if cands:
            self._check(cands)

    # Try all candidates in one probe; on a failure, one by one so one odd layer does not sink the rest.
    def _check(self, cands: list[_Candidate]) -> None:
        try:
            self._check_batch(cands)
        except ProbeError as e:
            if len(cands) == 1:
                self.results[id(cands[0].softmax)] = NoMatch(str(e), near=True)
                return
            for c in cands:
                self._check([c])

    def _check_batch(self, cands: list[_Candidate]) -> None:
        rng = np.random.default_rng(1234)
        static_b, static_s = _graph_input_dims(self.model)
        sizes = [(static_b or b, static_s or s) for b, s in _PROBE_SIZES]
        sizes = list(dict.fromkeys(sizes))
        xs = list({id(c.x): c.x for c in cands}.values())

        # Past lengths of the probes (a KV cache): distinct from the sizes, and 0 (the prefill).
        has_past = any(c.has_past for c in cands)
        runs = [(b, s, p if has_past else 0) for (b, s), p in zip(sizes, _PROBE_PAST)]

        # 1. Layouts and pre-MatMul scales of Q', K', V' (rotary inputs first, then the operands
        #    with the rotary outputs cut and fed random data, and the pasts they are joined to).
        B, S, P = runs[0]
        x_data: dict[int, np.ndarray] = {}
        for x in xs:
            c0 = next(c for c in cands if c.x is x)
            hidden = c0.q.arrays()[0].shape[0]
            x_data[id(x)] = (rng.standard_normal((B, S, hidden)) * 0.5).astype(_np_float(x))
        rots = list({id(p.rotary): p.rotary for c in cands for p in c.paths.values() if p.rotary is not None}.values())
        rot_in: dict[int, np.ndarray] = {}
        rot_feed: dict[int, np.ndarray] = {}
        if rots:
            probe = Probe(self.model, [r.inputs[0] for r in rots], cuts=xs)
            feeds = input_feeds([v for v in probe.inputs if v.is_graph_input()], B, S, rng,
                                past=P if has_past else None)
            feeds.update(x_data)
            for r, out in zip(rots, probe.run(feeds)):
                rot_in[id(r)] = out
                rot_feed[id(r.outputs[0])] = rng.standard_normal(out.shape).astype(out.dtype)
        heads: list[ir.Value] = []
        for c in cands:
            heads += [c.scores_mm.inputs[0], c.scores_mm.inputs[1], c.ctx_mm.inputs[1]]
            heads += [c.paths[k].past for k in ("k", "v") if c.paths[k].past is not None]  # type: ignore[misc]
        probe = Probe(self.model, heads, cuts=xs + [r.outputs[0] for r in rots])
        feeds = input_feeds([v for v in probe.inputs if v.is_graph_input()], B, S, rng,
                            past=P if has_past else None)
        feeds.update(x_data)
        feeds.update(rot_feed)
        outs = probe.run(feeds)
        live: list[tuple[_Candidate, int, int, float]] = []
        kv_heads: dict[int, int] = {}
        k = 0
        for c in cands:
            n_out = 3 + sum(c.paths[key].past is not None for key in ("k", "v"))
            qh, kh, vh, *pasts = outs[k : k + n_out]
            k += n_out
            res = self._layout(c, x_data[id(c.x)], (qh, kh, vh), pasts, rot_in, rot_feed, B, S)
            if isinstance(res, str):
                self.results[id(c.softmax)] = NoMatch(res, near=True)
            else:
                live.append((c, *res[:3]))
                kv_heads[id(c.softmax)] = res[3]
        if not live:
            return

        # 2. Masks, post-MatMul scale and head merge, on several sizes and masks.
        outputs: list[ir.Value] = []
        for c, *_ in live:
            outputs.append(c.softmax.inputs[0])
            outputs += c.merge_chain[1:]
        cuts = xs + [c.scores_mm.outputs[0] for c, *_ in live] + [c.ctx_mm.outputs[0] for c, *_ in live]
        probe = Probe(self.model, outputs, cuts=cuts)
        graph_inputs = [v for v in probe.inputs if v.is_graph_input()]
        mask_inputs = [
            v for v in graph_inputs
            if v.shape is not None and len(v.shape) == 2
            and (v.dtype is None or v.dtype.is_integer or v.dtype == ir.DataType.BOOL)
        ]
        # Try inputs named like a mask first: an ordering heuristic only, the check is numeric.
        mask_inputs.sort(key=lambda v: "mask" not in v.name.lower())
        hyps: list[ir.Value | None] = list(mask_inputs) or [None]
        merge_ok: dict[int, tuple[ir.Value, bool] | str] = {}
        verdicts: dict[int, MaskVerdict | str] = {}
        pending = list(live)
        # One hypothesis at a time (which input is the 2-D mask); stop once every layer is explained.
        for m in hyps:
            if not pending:
                break
            per_cand: dict[int, list[MaskRun]] = {id(c.softmax): [] for c, *_ in pending}
            for b, s, past in runs:
                fixed = {}
                if m is not None:
                    pat = padding_patterns(b, s + past, rng)
                    fixed[id(m)] = pat.astype(bool) if m.dtype == ir.DataType.BOOL else pat.astype(_np_int(m))
                for _variant in range(2):  # two different token ids: the mask must not depend on them
                    feeds = input_feeds(graph_inputs, b, s, rng, fixed=fixed, past=past if has_past else None)
                    scores, ctxs = {}, {}
                    for x in xs:
                        hidden = x_data[id(x)].shape[-1]
                        feeds[id(x)] = (rng.standard_normal((b, s, hidden)) * 0.5).astype(_np_float(x))
                    for c, n, d, _ in live:
                        scores[id(c)] = (rng.standard_normal((b, n, s, s + past)) * 2.0).astype(_np_float(c.x))
                        ctxs[id(c)] = rng.standard_normal((b, n, s, d)).astype(_np_float(c.x))
                        feeds[id(c.scores_mm.outputs[0])] = scores[id(c)]
                        feeds[id(c.ctx_mm.outputs[0])] = ctxs[id(c)]
                    outs = probe.run(feeds)
                    k = 0
                    for c, n, d, _ in live:
                        logits = outs[k]
                        merged = outs[k + 1 : k + len(c.merge_chain)]
                        k += len(c.merge_chain)
                        if id(c.softmax) in per_cand:
                            per_cand[id(c.softmax)].append(MaskRun(feeds, scores[id(c)], logits))
                        prev = merge_ok.get(id(c.softmax))
                        if not isinstance(prev, str):
                            merge_ok[id(c.softmax)] = self._merge(c, ctxs[id(c)], merged, b, s, n, d, prev)
            still = []
            for entry in pending:
                c = entry[0]
                verdict = classify_mask(per_cand[id(c.softmax)], [] if m is None else [m])
                if isinstance(verdict, MaskVerdict) or id(c.softmax) not in verdicts:
                    verdicts[id(c.softmax)] = verdict
                if not isinstance(verdict, MaskVerdict):
                    still.append(entry)
            pending = still

        for c, n, d, pre in live:
            merged = merge_ok.get(id(c.softmax))
            if isinstance(merged, str) or merged is None:
                self.results[id(c.softmax)] = NoMatch(merged or "head merge not checked", near=True)
                continue
            verdict = verdicts.get(id(c.softmax), "no mask input")
            if isinstance(verdict, str):
                where = c.softmax.inputs[0].producer()
                label = where.label() if where is not None else c.softmax.label()
                self.results[id(c.softmax)] = NoMatch(f"mask at {label}: {verdict}", near=True)
                continue
            out, flat = merged
            self.results[id(c.softmax)] = AttentionMatch(c, n, d, pre * verdict.post_scale, verdict, out, flat,
                                                         kv_heads[id(c.softmax)])

    @staticmethod
    def _layout(
        c: _Candidate, x: np.ndarray, ops: tuple[np.ndarray, np.ndarray, np.ndarray], pasts: list[np.ndarray],
        rot_in: dict[int, np.ndarray], rot_feed: dict[int, np.ndarray], B: int, S: int,
    ) -> tuple[int, int, float, int] | str:
        """``(num_heads, head_dim, q·k scale, kv_heads)`` when each operand is what attention needs.

        Expected, in float64: ``heads(x @ W + b)`` in ``[B,N,S,d]`` (or, after a rotary, the
        random data fed to the rotary output, the rotary input having been checked to be those
        heads), joined after the past on the sequence axis, each K/V head repeated
        ``num_heads / kv_heads`` times (``repeat_kv``), K transposed to ``[B,N,d,T]``.
        """
        qh, kh, vh = ops
        if qh.ndim != 4 or qh.shape[0] != B or qh.shape[2] != S:
            return f"query heads have shape {list(qh.shape)}, expected [batch, heads, seq, head_dim]"
        n, d = qh.shape[1], qh.shape[3]
        if c.q.stop - c.q.start != n * d:
            return f"query projection has {c.q.stop - c.q.start} columns, not num_heads*head_dim = {n}*{d}"
        kcols, vcols = c.k.stop - c.k.start, c.v.stop - c.v.start
        if kcols != vcols or kcols % d or n % max(1, kcols // d):
            return (f"key/value projections have {kcols}/{vcols} columns: not a group of heads of "
                    f"num_heads*head_dim = {n}*{d}")
        nkv = kcols // d
        rep = n // nkv
        past_iter = iter(pasts)
        scale = 1.0
        for name, proj, got, path, heads_n in (
            ("query", c.q, qh, c.paths["q"], n), ("key", c.k, kh, c.paths["k"], nkv), ("value", c.v, vh, c.paths["v"], nkv)
        ):
            w, b = proj.arrays()
            # einsum, not BLAS: tiny products, and BLAS thread pools stall on a loaded machine.
            y = np.einsum("bsh,hk->bsk", x.astype(np.float64), w.astype(np.float64), optimize=False) + b
            y = y.reshape(B, S, heads_n, d).transpose(0, 2, 1, 3)
            pre = 1.0
            if path.rotary is not None:
                cr = _ratio(rot_in[id(path.rotary)], y)
                if cr is None:
                    return f"the {name} rotary input is not the [B,N,S,d] view of the {name} projection"
                pre, y = cr, rot_feed[id(path.rotary.outputs[0])].astype(np.float64)
            if path.concat is not None:
                past = next(past_iter).astype(np.float64)
                if past.ndim != 4 or past.shape[:2] != y.shape[:2] or past.shape[3] != d:
                    return f"the {name} past has shape {list(past.shape)}, not [batch, {heads_n}, past, {d}]"
                y = np.concatenate([past, y], axis=2)
            if name != "query" and rep > 1:
                y = np.repeat(y, rep, axis=1)
            if name == "key":
                y = y.transpose(0, 1, 3, 2)
            cg = _ratio(got, y)
            if cg is None:
                return {
                    "query": "query heads are not a scaled [B,N,S,d] view of the query projection",
                    "key": "key operand is not a scaled [B,N,d,S] (transposed) view of the key projection"
                    + (" (after its past and head repeat)" if path.concat is not None or rep > 1 else ""),
                    "value": "values are not the [B,N,S,d] view of the value projection"
                    + (" (after its past and head repeat)" if path.concat is not None or rep > 1 else ""),
                }[name]
            if name == "value":
                if abs(cg * pre - 1.0) > 1e-5:
                    return "values are not the [B,N,S,d] view of the value projection"
            else:
                scale *= cg * pre
        return n, d, scale, nkv

    @staticmethod
    def _merge(
        c: _Candidate, ctx: np.ndarray, merged: list[np.ndarray], b: int, s: int, n: int, d: int,
        prev: tuple[ir.Value, bool] | None,
    ) -> tuple[ir.Value, bool] | str:
        """The last head-merge value equal to ``ctx`` as [B,S,N*d] (or flat [B*S,N*d])."""
        ref = ctx.transpose(0, 2, 1, 3).reshape(b, s, n * d)
        # Prefer the last [B,S,H] value; a flat [B*S,H] one only when there is none (dynamo GPT-2
        # flattens straight into the output projection's Gemm).
        best = None
        for v, arr in zip(c.merge_chain[1:], merged):
            if arr.shape in ((b, s, n * d), (b * s, n * d)) and np.array_equal(arr, ref.reshape(arr.shape)):
                if best is None or best[1] or arr.ndim == 3:
                    best = (v, arr.ndim == 2)
        if best is None:
            return f"the output of {c.ctx_mm.label()} is not merged back as transpose(0,2,1,3) + reshape to [B,S,H]"
        if prev is not None and best != prev:
            return "the head merge differs between probe sizes"
        return best


def _np_float(v: ir.Value) -> Any:
    dt = v.dtype
    return dt.numpy() if dt is not None and dt.is_float else np.float32


def _np_int(v: ir.Value) -> Any:
    dt = v.dtype
    return dt.numpy() if dt is not None and dt.is_integer else np.int64


# ------------------------------------------------------------------------------------------------
# Rule and pass
# ------------------------------------------------------------------------------------------------


class AttentionFusion(Rule):
    """Softmax attention core (+ projections, mask, head merge) → ``com.microsoft::Attention``."""

    name: ClassVar[str] = "attention"
    roots: ClassVar[tuple[str, ...]] = ("Softmax",)
    stat: ClassVar[str] = "fused attention layers"

    def __init__(self, analysis: _Analysis, *, standard: bool = False) -> None:
        self.analysis = analysis
        #: The target has no contrib attention: write matched layers in standard ops instead.
        self.standard = standard
        self.masks = StandardMasks(analysis.model.graph, analysis.model.opset("") or 17)

    def check(self, node: ir.Node, ctx: PassContext) -> AttentionMatch | NoMatch:
        if node.graph is not self.analysis.model.graph:
            return NoMatch("attention inside a subgraph is not fused", near=True)
        res = self.analysis.results.get(id(node))
        if res is None:
            return NoMatch("not analysed")
        if isinstance(res, AttentionMatch):
            live = [res.cand.softmax, res.cand.ctx_mm, res.cand.scores_mm]
            if any(n.graph is None for n in live) or res.output.producer() is None:
                return NoMatch("the layer changed after analysis")
            op = _fused_op(res)
            if ctx.target is not None and not ctx.target.supports(op, _MS):
                if self.standard:
                    why = standard_form_unsupported(res, self.masks.opset)
                    if why is None:
                        return res
                    if why.startswith("already"):
                        return NoMatch(why)
                    return NoMatch(f"target has no com.microsoft {op} and {why}; attention left as it is",
                                   near=True)
                return NoMatch(f"this layer needs com.microsoft {op}, which the target does not provide", near=True)
        return res

    def rewrite(self, m: AttentionMatch, rw: Rewriter, ctx: PassContext) -> None:
        if self.standard and ctx.target is not None and not ctx.target.supports(_fused_op(m), _MS):
            self.analysis.results[id(m.cand.softmax)] = NoMatch("already rewritten")
            graph = self.analysis.model.graph
            size = len(graph)
            out = rewrite_standard(m, rw, graph, self.masks)
            rw.replace_all_uses_with(m.output, out)
            self._finish(m, rw, [m.output], contrib=False)
            rw.count("attention layers in standard ops")
            rw.count("attention nodes removed (net)", size - len(graph))
            return
        if _fused_op(m) == "MultiHeadAttention":
            self._rewrite_mha(m, rw)
            rw.count("fused MultiHeadAttention")
            return
        rw.count("fused Attention")
        c = m.cand
        graph = self.analysis.model.graph
        self.analysis.results[id(c.softmax)] = NoMatch("already fused")
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
        att = rw.make("Attention", inputs, attrs, domain=_MS, before=anchor, name="Attention",
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
        cast = self.analysis.mask_casts.get(id(mask_in))
        if cast is None:
            first = next(iter(self.analysis.model.graph))
            cast = rw.make("Cast", [mask_in], {"to": int(ir.DataType.INT32)}, before=first,
                           name="attention_mask_index",
                           types=[ir.TensorType(ir.DataType.INT32, mask_in.shape)]).outputs[0]
            self.analysis.mask_casts[id(mask_in)] = cast
        return cast

    def _finish(self, m: AttentionMatch, rw: Rewriter, old: list[ir.Value], *, contrib: bool = True) -> None:
        c = m.cand
        model = self.analysis.model
        graph = model.graph
        if contrib:
            rw.import_opset(model, _MS)
        # Clean up what only the old layer read (dead-flow would too; this keeps one pass useful alone).
        cone: dict[int, ir.Node] = {}
        for v in old:
            cone.update((id(n), n) for n in _cone_nodes(v, stop={id(c.x)}))
        rw.erase_unused(reversed([n for n in graph if id(n) in cone]))
        for p in (c.q, c.k, c.v):
            for v in (p.weight, p.bias):
                if v is not None and v.is_initializer() and not v.has_uses() and not v.is_graph_output():
                    rw.remove_initializer(graph, v.name)

    def _rewrite_mha(self, m: AttentionMatch, rw: Rewriter) -> None:
        """The layer as ``MultiHeadAttention`` on 3-D Q/K/V (see the module docs for the forms)."""
        c = m.cand
        graph = self.analysis.model.graph
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

        qkv = make("MatMul", [c.x, const(np.concatenate([wq, wk, wv], axis=1), "attention_qkv_weight")],
                   name="attention_qkv").outputs[0]
        bias = np.concatenate([bq, bk, bv])
        if np.any(bias != 0):
            qkv = make("Add", [qkv, const(bias, "attention_qkv_bias")], name="attention_qkv_bias").outputs[0]
        q, k, v = make("Split", [qkv, const(np.array(cols, np.int64), "attention_qkv_split")], {"axis": -1},
                       outputs=3, name="attention_qkv_split").outputs
        assert q is not None and k is not None and v is not None
        rotated = {}
        for key, val in (("q", q), ("k", k)):
            rot = c.paths[key].rotary
            if rot is not None:  # the same rotation on the 3-D [B,S,heads*d] form: per head, per position
                attrs = {"interleaved": int(rot.attr("interleaved", 0))}
                val = make("RotaryEmbedding", [val, *rot.inputs[1:4]], attrs, domain=_MS).outputs[0]
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
        mha = rw.make("MultiHeadAttention", inputs, attrs, domain=_MS, before=anchor, name="MultiHeadAttention",
                      output_names=names, types=types)
        out = mha.outputs[0]
        assert out is not None
        if m.output_2d:
            shape = const(np.array([-1, n * d], np.int64), "attention_out_shape")
            out = make("Reshape", [out, shape], name="attention_flatten").outputs[0]
        rw.replace_all_uses_with(m.output, out)
        for ov, i in presents:
            rw.replace_all_uses_with(ov, mha.outputs[i])  # type: ignore[arg-type]
            old.append(ov)
        self._finish(m, rw, old)


def _fused_op(m: AttentionMatch) -> str:
    """``Attention`` (packed QKV, raw mask) when it expresses the layer, else ``MultiHeadAttention``."""
    if m.cand.has_past or m.cand.has_rotary or m.group > 1:
        return "MultiHeadAttention"
    return "Attention"


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


@register_pass
@dataclass(frozen=True)
class FuseAttentionPass(Pass):
    """Fuse multi-head self-attention layers into ``com.microsoft::Attention`` (see module docs)."""

    name: ClassVar[str] = "fuse-attention"
    summary: ClassVar[str] = "self-attention (projections, mask, softmax, head merge) -> com.microsoft Attention"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        rw = Rewriter()
        if not any(n.op_type == "Softmax" for n in model.graph.all_nodes()):
            return rw.result()
        target = ctx.target
        standard = target is not None and not (
            target.supports("Attention", _MS) or target.supports("MultiHeadAttention", _MS))
        analysis = _Analysis(model, ctx)
        apply_rules(model, [AttentionFusion(analysis, standard=standard)], ctx, rw, pass_name=self.name)
        return rw.result()
