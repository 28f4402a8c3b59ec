"""fuse-embed-layer-norm: BERT-style embeddings → onnxruntime's ``com.microsoft::EmbedLayerNormalization``.

The match is anchored at a ``LayerNormalization`` over the last axis whose input is a sum (any
order, any association of the ``Add`` nodes) of two or three embedding lookups::

    word     = Gather(word_table,     input_ids)          # indices: a 2-D model input
    position = Gather(position_table, position_indices)   # indices: computed, must be arange(S)
    segment  = Gather(segment_table,  token_type_ids)     # optional (DistilBERT has none)
    y = LayerNormalization(word + position [+ segment], γ, β)

→ ``EmbedLayerNormalization(Cast(input_ids → int32), [Cast(token_type_ids → int32)], word_table,
position_table, [segment_table], γ, β)`` with ``epsilon`` from the norm and ``mask_index_type=0``
(no mask input and no ``mask_index`` output: the attention layers keep their own raw mask).

The fused op indexes the position table at ``s`` for token ``s`` of every row, so the position
indices are *checked by evaluation*, not by matching the exporters' ``Shape/Slice/Unsqueeze``
forms: their cone is copied into a probe model (:mod:`passes.fusions._attention_probe`) and run in
onnxruntime at several batch and sequence sizes with different token ids; it must give
``arange(S)`` broadcast over the batch every time. RoBERTa's positions (``padding_idx + 1 +
cumsum(ids != pad)``) fail the check and are reported as a near miss.

The op is fused only on targets providing ``com.microsoft::EmbedLayerNormalization`` (onnxruntime
1.32's CPU kernel is float32-only; it runs without mask, segment or position-id inputs).
Differences from the unfused graph that real inputs never hit: ids are cast to int32, and a
negative or out-of-range id is an error instead of Gather's wrap-around.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

import ir

from ._attention_probe import Probe, ProbeError, input_feeds
from ..framework.base import Pass, PassContext, PassResult
from ..framework.match import const_array, only_users, producer
from ..framework.rules import NoMatch, Rule, apply_rules
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter

__all__ = ["FuseEmbedLayerNormPass", "EmbedLayerNormFusion"]

_MS = "com.microsoft"
_OP = "EmbedLayerNormalization"
# Probe sizes (batch, sequence) for dynamic dims: distinct, and including a batch of one.
_PROBE_SIZES = ((2, 7), (3, 5), (1, 6))
_INT_TYPES = (ir.DataType.INT64, ir.DataType.INT32)


@dataclass
class _Lookup:
    """``Gather(table, indices)`` on axis 0 of a constant 2-D float32 table."""

    node: ir.Node
    table: ir.Value
    indices: ir.Value
    rows: int


@dataclass
class EmbedMatch:
    """A checked embedding block, ready to rewrite."""

    norm: ir.Node
    word: _Lookup
    position: _Lookup
    segment: _Lookup | None
    adds: list[ir.Node]
    eps: float


def _lookup(v: ir.Value | None, hidden: int) -> _Lookup | str:
    g = producer(v, "Gather")
    if g is None:
        return "a summand is not an embedding lookup (Gather)"
    table, idx = g.inputs[0], g.inputs[1]
    arr = const_array(table)
    if table is None or idx is None or arr is None:
        return f"{g.label()} does not read a constant table"
    if int(g.attr("axis", 0)) != 0 or arr.ndim != 2 or arr.shape[1] != hidden:
        return f"{g.label()} is not a row lookup in a [rows, {hidden}] table"
    if arr.dtype != np.float32:
        return f"{g.label()}: the table is {arr.dtype}, the CPU kernel takes float32"
    if idx.dtype is not None and idx.dtype not in _INT_TYPES:
        return f"{g.label()}: indices of type {idx.dtype.name} are not int32/int64"
    return _Lookup(g, table, idx, int(arr.shape[0]))


def _summands(v: ir.Value, root: ir.Node) -> tuple[list[ir.Value], list[ir.Node]] | None:
    """The leaves of the ``Add`` tree computing ``v`` (interior sums read only inside the tree)."""
    leaves: list[ir.Value] = []
    adds: list[ir.Node] = []
    stack: list[tuple[ir.Value, ir.Node]] = [(v, root)]
    while stack:
        x, reader = stack.pop()
        add = producer(x, "Add")
        if add is None or len(leaves) + len(stack) > 4:
            leaves.append(x)
            continue
        if not only_users(x, {reader}):
            return None
        adds.append(add)
        for operand in reversed(add.inputs):
            if operand is None:
                return None
            stack.append((operand, add))
    return leaves, adds


def _model_input(v: ir.Value) -> bool:
    s = v.shape
    return v.is_graph_input() and v.dtype in _INT_TYPES and s is not None and len(s) == 2


def _cone_nodes(v: ir.Value) -> list[ir.Node]:
    """Every node ``v`` depends on (the position-index computation), producers last."""
    out: list[ir.Node] = []
    seen: set[int] = set()
    stack = [v]
    while stack:
        n = stack.pop().producer()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        out.append(n)
        stack.extend(x for x in n.inputs if x is not None)
    return out


@dataclass(frozen=True)
class EmbedLayerNormFusion(Rule):
    """Word + position (+ segment) lookups, their sum and the LayerNorm → ``EmbedLayerNormalization``.

    Attributes:
        model: the model being rewritten (the position probe copies from it).
        verdicts: position-index verdicts by value id (``None`` when ``arange(S)``), so each cone is
            probed once per run.
    """

    model: ir.Model
    verdicts: dict[int, str | None] = field(default_factory=dict)

    name: ClassVar[str] = "embed-layer-norm"
    roots: ClassVar[tuple[str, ...]] = ("LayerNormalization",)
    stat: ClassVar[str] = "fused EmbedLayerNorm"

    def check(self, node: ir.Node, ctx: PassContext) -> EmbedMatch | NoMatch:
        if ctx.target is None or not ctx.target.supports(_OP, _MS):
            return NoMatch(f"the target does not provide {_OP}")
        x = node.inputs[0]
        if x is None or producer(x, "Add") is None:
            return NoMatch("the norm does not read a sum")
        tree = _summands(x, node)
        if tree is None:
            return NoMatch("a partial sum is read elsewhere")
        leaves, adds = tree
        if not any(producer(v, "Gather") is not None for v in leaves):
            return NoMatch("not an embedding sum")
        # From here on the norm reads embedding lookups: failures are near misses worth a note.
        gamma = node.inputs[1] if len(node.inputs) > 1 else None
        beta = node.inputs[2] if len(node.inputs) > 2 else None
        g_arr = const_array(gamma)
        b_arr = const_array(beta) if beta is not None else None
        if g_arr is None or g_arr.ndim != 1 or (beta is not None and (b_arr is None or b_arr.shape != g_arr.shape)):
            return NoMatch("γ/β are not 1-D constants", near=True)
        hidden = int(g_arr.shape[0])
        if len(leaves) not in (2, 3):
            return NoMatch(f"the embedding sum has {len(leaves)} terms, not 2 or 3", near=True)
        axis = int(node.attr("axis", -1))
        rank = len(x.shape) if x.shape is not None else 3
        if axis not in (-1, rank - 1) or int(node.attr("stash_type", 1)) != 1:
            return NoMatch("the norm is not over the last axis in float32", near=True)
        if any(o is not None and (o.has_uses() or o.is_graph_output()) for o in node.outputs[1:]):
            return NoMatch("the norm's mean/inv-std outputs are read", near=True)
        lookups: list[_Lookup] = []
        for v in leaves:
            lk = _lookup(v, hidden)
            if isinstance(lk, str):
                return NoMatch(lk, near=True)
            lookups.append(lk)
        if len({id(lk.node) for lk in lookups}) != len(lookups):
            return NoMatch("a lookup is summed twice", near=True)
        direct = sorted((lk for lk in lookups if _model_input(lk.indices)), key=lambda lk: -lk.rows)
        computed = [lk for lk in lookups if not _model_input(lk.indices)]
        if not direct:
            return NoMatch("no lookup is indexed by a 2-D model input (input_ids)", near=True)
        if not computed:
            return NoMatch("no lookup at computed (position) indices", near=True)
        word = direct[0]
        verdicts = [(lk, self._positions(lk, word.indices)) for lk in computed]
        positions = [lk for lk, v in verdicts if v is None]
        if not positions:
            why = "; ".join(f"{lk.node.label()}: {v}" for lk, v in verdicts)
            return NoMatch(f"no lookup is at arange(S) positions ({why}); offset positions such as "
                           "RoBERTa's are not fused", near=True)
        if len(computed) > 1:
            others = ", ".join(lk.node.label() for lk in computed if lk is not positions[0])
            return NoMatch(f"{others} looks up computed indices, not a model input (segment ids must be one)",
                           near=True)
        pos = positions[0]
        segment = direct[1] if len(direct) > 1 else None
        if segment is not None and segment.indices.shape != word.indices.shape:
            return NoMatch(f"segment ids %{segment.indices.name} {segment.indices.shape} and input ids "
                           f"%{word.indices.name} {word.indices.shape} differ in shape", near=True)
        # The lookups vanish with the fusion; other readers may only be in the position-index
        # computation, which vanishes too (DistilBERT's TorchScript export takes the sequence
        # length from the word embeddings' shape).
        cone = set(map(id, _cone_nodes(pos.indices)))
        for lk in lookups:
            out = lk.node.outputs[0]
            assert out is not None
            if out.is_graph_output() or any(id(n) not in cone and n not in adds for n, _ in out.uses()):
                return NoMatch(f"the lookup {lk.node.label()} is read elsewhere", near=True)
        return EmbedMatch(node, word, pos, segment, adds, float(node.attr("epsilon", 1e-5)))

    # -- the position check ---------------------------------------------------------------------
    def _positions(self, pos: _Lookup, ids: ir.Value) -> str | None:
        """``None`` when ``pos.indices`` is ``arange(S)`` broadcast over ``ids``' batch, else why not."""
        key = id(pos.indices)
        if key not in self.verdicts:
            self.verdicts[key] = self._probe_positions(pos, ids)
        return self.verdicts[key]

    def _probe_positions(self, pos: _Lookup, ids: ir.Value) -> str | None:
        assert ids.shape is not None
        b_dim, s_dim = ids.shape
        arr = const_array(pos.indices)
        if arr is not None:  # folded with static shapes
            if not isinstance(s_dim, int):
                return f"constant position indices {arr.shape} for a dynamic sequence length"
            return _arange_verdict(arr, b_dim if isinstance(b_dim, int) else 1, s_dim)
        try:
            probe = Probe(self.model, [pos.indices])
        except ProbeError as e:
            return f"position indices cannot be probed: {e}"
        inputs = [v for v in probe.inputs if v.is_graph_input()]
        for v in inputs:
            if v.shape is None or len(v.shape) < 2 or tuple(v.shape[:2]) != tuple(ids.shape):
                return (f"position indices depend on %{v.name} {v.shape}, whose [batch, sequence] dims "
                        f"are not those of %{ids.name} {ids.shape}")
        sizes = [(b_dim, s_dim)] if isinstance(b_dim, int) and isinstance(s_dim, int) else [
            (b_dim if isinstance(b_dim, int) else b, s_dim if isinstance(s_dim, int) else s) for b, s in _PROBE_SIZES
        ]
        rng = np.random.default_rng(0)
        for b, s in sizes:
            for _variant in range(2):  # two different token ids: positions must not depend on them
                feeds = input_feeds(inputs, b, s, rng)
                try:
                    (got,) = probe.run(feeds)
                except ProbeError as e:
                    return str(e)
                verdict = _arange_verdict(np.asarray(got), b, s)
                if verdict is not None:
                    return verdict
        return None

    # -- rewrite --------------------------------------------------------------------------------
    def rewrite(self, match: EmbedMatch, rw: Rewriter, ctx: PassContext) -> None:
        norm = match.norm
        graph = norm.graph
        assert graph is not None
        out = norm.outputs[0]
        assert out is not None

        def int32(v: ir.Value) -> ir.Value:
            if v.dtype == ir.DataType.INT32:
                return v
            cast = rw.make("Cast", [v], {"to": int(ir.DataType.INT32)}, before=norm, name=f"{v.name}_int32",
                           types=[ir.TensorType(ir.DataType.INT32, v.shape)])
            return cast.outputs[0]  # type: ignore[return-value]

        beta = norm.inputs[2] if len(norm.inputs) > 2 else None
        if beta is None:
            beta = rw.constant(graph, np.zeros(const_array(norm.inputs[1]).shape, np.float32),  # type: ignore[union-attr]
                               name="embed_norm_beta")
        seg = match.segment
        inputs: list[ir.Value | None] = [
            int32(match.word.indices), int32(seg.indices) if seg is not None else None,
            match.word.table, match.position.table, seg.table if seg is not None else None,
            norm.inputs[1], beta,
        ]
        new = rw.make(_OP, inputs, {"epsilon": match.eps, "mask_index_type": 0}, domain=_MS, before=norm,
                      name="EmbedLayerNorm", output_names=["embed_norm"], types=[out.type])
        rw.replace_all_uses_with(out, new.outputs[0])  # type: ignore[arg-type]
        lookups = [lk.node for lk in (match.word, match.position, seg) if lk is not None]
        cone = _cone_nodes(match.position.indices)
        rw.erase([norm, *match.adds])
        rw.erase_unused([*lookups, *cone])


def _arange_verdict(got: np.ndarray, b: int, s: int) -> str | None:
    """``None`` when ``got`` is ``arange(s)`` as ``[s]``, ``[1, s]`` or ``[b, s]``, else what it is."""
    if got.shape not in ((s,), (1, s), (b, s)):
        return f"indices of shape {list(got.shape)} at batch {b}, sequence {s}"
    rows = np.broadcast_to(got, (b, s))
    bad = [r for r in rows if not np.array_equal(r, np.arange(s))]
    if bad:
        head = ", ".join(str(int(i)) for i in bad[0][:4])
        return f"indices are not arange(S): a row starts [{head}, ...] at batch {b}, sequence {s}"
    return None


@register_pass
@dataclass(frozen=True)
class FuseEmbedLayerNormPass(Pass):
    """Fuse the embedding block (lookups, sum, LayerNorm) into ``com.microsoft::EmbedLayerNormalization``."""

    name: ClassVar[str] = "fuse-embed-layer-norm"
    summary: ClassVar[str] = "word + position (+ segment) embeddings and their LayerNorm -> EmbedLayerNormalization"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Apply :class:`EmbedLayerNormFusion` to a fixed point (nothing on targets without the op)."""
        rw = Rewriter()
        if ctx.target is None or not ctx.target.supports(_OP, _MS):
            return rw.result()
        if apply_rules(model, [EmbedLayerNormFusion(model)], ctx, rw, pass_name=self.name):
            rw.import_opset(model, _MS)
        return rw.result()
