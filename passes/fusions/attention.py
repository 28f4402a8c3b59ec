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
  (:mod:`passes.fusions._attention_mask`), which also gives the post-MatMul scale;
* or, once a *score bias* is taken off, such a mask (or none): ``scale·Q·Kᵀ + B`` where ``B``
  is the sum of the graph values the region adds to the scores (ALiBi, T5/MPNet/Swin relative
  position biases) and of the blocking ``Where`` conditions it applies (GPT-Neo's banded buffer),
  checked on the probes to be independent of the scores and of the hidden states (a bias read
  from the query or key values is refused), with the ``[1|B, 1|N, 1|S, T]`` shape of
  MultiHeadAttention's ``attention_bias``. A sliding-window mask is such a ``B``, checked at a
  length past the window.

Batched heads (Bloom's ``baddbmm``/``bmm``): the MatMuls may work on ``[B·N, S, ·]`` operands,
with Reshapes between the scores and the 4-D mask/Softmax region and between the probabilities
and the context MatMul; the check reads them as batch-major ``[B, N, ·, ·]`` views
(:mod:`~passes.fusions._attention_heads3d`), a bias term added in the 3-D view (ALiBi) included.
A role picked out of a view of the packed projection (Bloom's per-head ``[N, 3, d]``) takes its
weight columns by a compile-time gather (:mod:`~passes.fusions._attention_columns`).

Decoder paths may also hold, from the operand back (see :mod:`~passes.fusions._attention_match`):
a GQA head repeat (``Unsqueeze/Expand/Reshape``), a KV cache ``Concat(past, new)`` on the
sequence axis, and a ``com.microsoft::RotaryEmbedding`` (so ``fuse-rotary`` runs first in the
pipelines). The checks
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

A layer with a score bias becomes ``MultiHeadAttention`` with ``attention_bias`` = ``B``: the
graph's own bias values stay (computed once, and shared by the layers that add the same values:
T5's position bias), summed, unsqueezed to 4-D and expanded over the query rows only where the op
needs it, next to the key padding mask and ``unidirectional`` of what remains. A bias sized by a
``Shape`` of the layer's own heads (T5, MPT) is sized from the layer input instead (each element
probed to be the batch, the sequence or a constant), so the replaced projections go; one read
from what the op replaces (a present key) is refused. Query rows the bias
blocks entirely are NaN in the op; where the original zeroes them behind a NaN guard, they are
zeroed in the bias and the layer's output is multiplied by a 0/1 row scale (exact). Gemma-2's
logit soft-capping (``c·tanh(s/c)`` before the mask) has no MultiHeadAttention form and stays
decomposed with an ``--explain`` line (onnxruntime 1.32's CPU ``GroupQueryAttention`` has a
``softcap`` attribute, but see below why GQA is not used); so does DeBERTa's disentangled
attention, whose position terms are products with the query and key.

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
Reshape, with the additive ``bias`` built once per model from the 2-D mask (plus the score bias,
joined in one ``Add``). Other layers there are left as they are, with a note.

The options choose among the forms a layer and the target allow (``--autotune`` measures them):
``form=auto`` is the above; ``form=mha`` writes every layer as MultiHeadAttention (an encoder
layer then reads one packed ``[H, 3H]`` projection and a Split), ``form=standard`` writes the
layers the standard-op form covers in standard ops on any target (the others keep their contrib
op). ``qkv=split`` gives MultiHeadAttention three projections ``x @ W + b`` instead of the packed
one and its Split, so that the quantize pass decides int8 or float for Q, K and V one by one
(Attention takes packed weights; the standard form packs). A form the target lacks falls back to
``auto``'s.

The pieces, in the order a layer goes through them: :mod:`~passes.fusions._attention_match` (the
match types and the syntactic walk), :mod:`~passes.fusions._attention_check` (the probe-evaluated
checks, with :mod:`~passes.fusions._attention_probe` and :mod:`~passes.fusions._attention_mask`),
then :mod:`~passes.fusions._attention_contrib` or :mod:`~passes.fusions._attention_standard` (the
rewrite). This module holds the rule and the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import ir

from ._attention_check import Analysis
from ._attention_contrib import ContribAttention
from ._attention_match import MS, AttentionMatch, erase_layer
from ._attention_match import fused_op as _layer_op
from ._attention_standard import StandardMasks, rewrite_standard, standard_form_unsupported
from ..framework.base import Pass, PassContext, PassError, PassResult
from ..framework.rules import NoMatch, Rule, apply_rules
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter

__all__ = ["FuseAttentionPass", "AttentionFusion", "FORMS"]

#: :attr:`FuseAttentionPass.form`'s values.
FORMS = ("auto", "mha", "standard")


def fused_op(m: AttentionMatch) -> str:
    """The contrib op for ``m``: ``MultiHeadAttention`` for a score bias (its ``attention_bias``)."""
    return "MultiHeadAttention" if m.mask.bias else _layer_op(m)


class AttentionFusion(Rule):
    """Softmax attention core (+ projections, mask, head merge) → ``com.microsoft::Attention``."""

    name: ClassVar[str] = "attention"
    roots: ClassVar[tuple[str, ...]] = ("Softmax",)
    stat: ClassVar[str] = "fused attention layers"

    def __init__(self, analysis: Analysis, *, standard: bool = False, form: str = "auto",
                 split_qkv: bool = False) -> None:
        self.analysis = analysis
        #: The target has no contrib attention: write matched layers in standard ops instead.
        self.standard = standard
        #: Which form to prefer where the layer and the target allow it (:attr:`FuseAttentionPass.form`).
        self.form = form
        #: MultiHeadAttention layers get three projections instead of one packed MatMul and a Split.
        self.split_qkv = split_qkv
        self.masks = StandardMasks(analysis.model.graph, analysis.model.opset("") or 17)
        self.contrib = ContribAttention(analysis.model)

    def _preferred(self, m: AttentionMatch) -> list[str]:
        """The forms to try for ``m``, best first: contrib op names, or ``"standard"``."""
        auto = [fused_op(m)] + (["standard"] if self.standard else [])
        if self.form == "standard":
            return ["standard", *auto]
        if self.form == "mha":  # MultiHeadAttention expresses every layer Attention does
            return ["MultiHeadAttention", *[f for f in auto if f != "MultiHeadAttention"]]
        return auto

    def form_of(self, m: AttentionMatch, ctx: PassContext) -> str | NoMatch:
        """The form ``m`` is written in: the first of :meth:`_preferred` that the layer and target allow."""
        preferred = self._preferred(m)
        why_standard = None
        for form in preferred:
            if form == "standard":
                why_standard = standard_form_unsupported(m, self.masks.opset)
                if why_standard is None:
                    return form
                if why_standard.startswith("already") and form == preferred[0]:
                    return NoMatch(why_standard)
            elif ctx.target is None or ctx.target.supports(form, MS):
                return form
        op = next(f for f in preferred if f != "standard")
        if why_standard is not None and not why_standard.startswith("already"):
            return NoMatch(f"target has no com.microsoft {op} and {why_standard}; attention left as it is", near=True)
        if why_standard is not None:
            return NoMatch(why_standard)
        return NoMatch(f"this layer needs com.microsoft {op}, which the target does not provide", near=True)

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
            form = self.form_of(res, ctx)
            if isinstance(form, NoMatch):
                return form
        return res

    def rewrite(self, m: AttentionMatch, rw: Rewriter, ctx: PassContext) -> None:
        form = self.form_of(m, ctx)
        assert not isinstance(form, NoMatch), form
        self.analysis.results[id(m.cand.softmax)] = NoMatch("already rewritten")
        if form == "standard":
            graph = self.analysis.model.graph
            size = len(graph)
            out = rewrite_standard(m, rw, graph, self.masks)
            rw.replace_all_uses_with(m.output, out)
            erase_layer(m, rw, self.analysis.model, [m.output])
            rw.count("attention layers in standard ops")
            rw.count("attention nodes removed (net)", size - len(graph))
        elif form == "MultiHeadAttention":
            self.contrib.multi_head_attention(m, rw, split_qkv=self.split_qkv)
            rw.count("fused MultiHeadAttention")
        else:
            self.contrib.attention(m, rw)
            rw.count("fused Attention")


@register_pass
@dataclass(frozen=True)
class FuseAttentionPass(Pass):
    """Fuse multi-head self-attention layers into ``com.microsoft::Attention`` (see module docs)."""

    name: ClassVar[str] = "fuse-attention"
    summary: ClassVar[str] = "self-attention (projections, mask, softmax, head merge) -> com.microsoft Attention"

    #: The form to prefer where the layer and the target allow it: ``auto`` (Attention with packed
    #: weights where it expresses the layer, else MultiHeadAttention; standard ops on targets with
    #: neither), ``mha`` (MultiHeadAttention for every layer), ``standard`` (the standard-op form for
    #: the layers it covers, the contrib op for the others). ``--autotune`` measures them.
    form: str = "auto"
    #: ``packed`` (one MatMul and a Split before MultiHeadAttention) or ``split`` (three projections,
    #: each quantized or kept float on its own). Attention takes packed weights; the standard form packs.
    qkv: str = "packed"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if self.form not in FORMS:
            raise PassError(f"fuse-attention: form must be one of {', '.join(FORMS)}, not {self.form!r}")
        if self.qkv not in ("packed", "split"):
            raise PassError(f"fuse-attention: qkv must be packed or split, not {self.qkv!r}")
        rw = Rewriter()
        if not any(n.op_type == "Softmax" for n in model.graph.all_nodes()):
            return rw.result()
        target = ctx.target
        standard = target is not None and not (
            target.supports("Attention", MS) or target.supports("MultiHeadAttention", MS))
        analysis = Analysis(model, ctx)
        rule = AttentionFusion(analysis, standard=standard, form=self.form, split_qkv=self.qkv == "split")
        apply_rules(model, [rule], ctx, rw, pass_name=self.name)
        return rw.result()
