"""The semantic half of attention matching: what a candidate's paths compute, checked by evaluation.

:class:`Analysis` runs once per pass run over every Softmax of the main graph. The syntactic
match (:func:`passes.fusions._attention_match.find_candidate`) gives candidates; probe models
(:mod:`passes.fusions._attention_probe`) of all of them then run in onnxruntime, in two rounds:

1. the Q', K', V' operands against ``heads(x @ W + b)`` in float64 (through a rotary, a past and
   a GQA head repeat): the layout, ``num_heads``, ``head_dim``, ``kv_heads`` and the pre-MatMul
   scale;
2. the region between the scores and the Softmax on several sizes and 0/1 masks, classified by
   :mod:`passes.fusions._attention_mask` (which also gives the post-MatMul scale), and the head
   merge against ``transpose(0,2,1,3) + reshape``. A region that adds graph values to the scores
   (:func:`~passes.fusions._attention_bias.bias_terms`: ALiBi, relative position biases, a sliding-window mask) is read again
   with their sum taken off (:func:`~passes.fusions._attention_mask.classify_biased`), on a third
   run per size with the same graph inputs and other hidden states and scores: the sum must not
   change (a bias that depends on the query or key values is no ``attention_bias``).

Each Softmax ends with an :class:`~passes.fusions._attention_match.AttentionMatch` or a
:class:`~passes.framework.rules.NoMatch` saying why (a near miss for ``--explain``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

import ir

from ._attention_bias import bias_terms, disentangled_reason, own_term, shape_recipe, shape_reads, softcap_reason
from ._attention_mask import BiasTerm, MaskRun, MaskVerdict, classify_biased, classify_mask, padding_patterns
from ._attention_match import AttentionMatch, Candidate, find_candidate
from ._attention_probe import Probe, ProbeError, float_dtype, input_feeds, int_dtype
from ..framework.base import PassContext
from ..framework.match import const_array
from ..framework.rules import NoMatch

__all__ = ["Analysis"]

# Probe sizes (batch, sequence): distinct from each other and from typical head counts.
_PROBE_SIZES = ((2, 7), (3, 5), (1, 6))
# Past (KV-cache) lengths of those probes, for layers that concatenate a cache.
_PROBE_PAST = (4, 3, 0)


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


_MAX_WINDOW_PROBE = 1024
# Ops whose integer constant operand may be a position offset (a window) in a mask's arithmetic.
_OFFSET_OPS = frozenset({"Add", "Sub", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"})


def _window_length(probe_model: ir.Model) -> int | None:
    """A sequence length past any sliding window of a probe's mask, or ``None`` when none shows.

    A window shows as an integer scalar constant (> 1) that the mask arithmetic adds or compares,
    or as a constant square mask buffer that the mask slices (GPT-Neo's banded ``bias``);
    the caller probes at the longest length up to two past it that the layers run at.
    """
    best = None
    for node in probe_model.graph:
        if node.domain != "" or node.op_type not in _OFFSET_OPS | {"Slice"}:
            continue
        for i, v in enumerate(node.inputs):
            arr = const_array(v) if v is not None else None
            if arr is None:
                continue
            if node.op_type == "Slice":
                # A square [.., T, T] buffer (not an embedding table, not ALiBi's [heads, 1, T] slopes).
                length = arr.shape[-1] if i == 0 and arr.ndim >= 2 and arr.shape[-1] == arr.shape[-2] else None
            elif arr.size == 1 and np.issubdtype(arr.dtype, np.integer):
                value = abs(int(arr.reshape(-1)[0]))
                length = value if 1 < value < 2**31 else None
            else:
                length = None
            if length is not None and (best is None or length > best):
                best = length
    return best


def _terms_cover(outs: list[np.ndarray], cands: list[Candidate], terms: dict[int, tuple[BiasTerm, ...]],
                 reads: dict[int, list[ir.Value]], length: int) -> bool:
    """True when every layer's bias terms (laid out after its logits and head merge) span ``length`` keys."""
    k = 0
    for c in cands:
        k += len(c.merge_chain)
        n = len(terms[id(c.softmax)])
        shapes = [a.shape for a in outs[k : k + n]]
        k += n + len(reads[id(c.softmax)])
        try:
            if shapes and np.broadcast_shapes(*shapes)[-1:] != (length,):
                return False
        except ValueError:
            return False
    return True


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


class Analysis:
    """Per-run checks of all candidate Softmax nodes of the main graph (the pass keeps no state)."""

    def __init__(self, model: ir.Model, ctx: PassContext) -> None:
        self.model = model
        #: ``id(softmax)`` -> the checked layer, or why it is not one.
        self.results: dict[int, AttentionMatch | NoMatch] = {}
        opset = model.opset("") or 17
        cands: list[Candidate] = []
        for node in model.graph:
            if node.op_type != "Softmax" or node.domain != "":
                continue
            c = find_candidate(node, opset)
            if isinstance(c, str):
                self.results[id(node)] = NoMatch(softcap_reason(node) or disentangled_reason(node) or c, near=True)
            else:
                cands.append(c)
        if cands:
            self._check(cands)

    # Try all candidates in one probe; on a failure, one by one so one odd layer does not sink the rest.
    def _check(self, cands: list[Candidate]) -> None:
        try:
            self._check_batch(cands)
        except ProbeError as e:
            if len(cands) == 1:
                self.results[id(cands[0].softmax)] = NoMatch(str(e), near=True)
                return
            for c in cands:
                self._check([c])

    def _check_batch(self, cands: list[Candidate]) -> None:
        rng = np.random.default_rng(1234)
        static_b, static_s = _graph_input_dims(self.model)
        xs = list({id(c.x): c.x for c in cands}.values())
        # The layers' inputs fix what the model's own inputs imply (a vision encoder's sequence is
        # its patch count, whatever the probe would pick): their static dims win.
        for x in xs:
            shape = x.shape
            if shape is not None and len(shape) == 3:
                static_b = shape[0] if isinstance(shape[0], int) else static_b
                static_s = shape[1] if isinstance(shape[1], int) else static_s
        sizes = [(static_b or b, static_s or s) for b, s in _PROBE_SIZES]
        sizes = list(dict.fromkeys(sizes))

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
            x_data[id(x)] = (rng.standard_normal((B, S, hidden)) * 0.5).astype(float_dtype(x))
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
        live: list[tuple[Candidate, int, int, float]] = []
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
        terms = {id(c.softmax): bias_terms(c) for c, *_ in live}
        reads = {id(c.softmax): shape_reads(c, terms[id(c.softmax)]) for c, *_ in live}
        shapes: dict[int, list[tuple[int, int, int, list[np.ndarray]]]] = {id(c.softmax): [] for c, *_ in live}
        for c, *_ in live:
            outputs.append(c.softmax.inputs[0])
            outputs += c.merge_chain[1:]
            outputs += [t.value for t in terms[id(c.softmax)]]
            outputs += reads[id(c.softmax)]
        cuts = xs + [c.scores_mm.outputs[0] for c, *_ in live] + [c.ctx_mm.outputs[0] for c, *_ in live]
        probe = Probe(self.model, outputs, cuts=cuts)
        graph_inputs = [v for v in probe.inputs if v.is_graph_input()]

        def sized_feeds(b: int, s: int, past: int, fixed: dict[int, np.ndarray]) -> tuple[dict, dict, dict]:
            # (fixed may hold every graph input: then only the hidden states and scores are new)
            feeds = input_feeds(graph_inputs, b, s, rng, fixed=fixed, past=past if has_past else None)
            scores, ctxs = {}, {}
            for x in xs:
                hidden = x_data[id(x)].shape[-1]
                feeds[id(x)] = (rng.standard_normal((b, s, hidden)) * 0.5).astype(float_dtype(x))
            for c, n, d, _ in live:
                scores[id(c)] = (rng.standard_normal((b, n, s, s + past)) * 2.0).astype(float_dtype(c.x))
                ctxs[id(c)] = rng.standard_normal((b, n, s, d)).astype(float_dtype(c.x))
                feeds[id(c.scores_mm.outputs[0])] = scores[id(c)]
                feeds[id(c.ctx_mm.outputs[0])] = ctxs[id(c)]
            return feeds, scores, ctxs

        # A sliding window is invisible at sequences shorter than it: probe past the largest
        # position offset (or mask buffer) the mask holds, at the longest length the model runs.
        window = _window_length(probe.model)
        long_run = 0  # the sequence of the extra probe run (0: none)
        # (With a static sequence no longer than the window, the window never applies.)
        if window is not None and static_s is None and window > max(s for _, s, _ in runs):
            reason = (f"the mask holds position offsets or a mask buffer up to {window} positions (a sliding "
                      f"window?), longer than a probe checks ({_MAX_WINDOW_PROBE}); kept as it is")
            if window <= _MAX_WINDOW_PROBE:
                reason = f"the mask holds position offsets up to {window} (a sliding window?) and the layers do " \
                         f"not run at that length; kept as it is"
                for length in range(window + 2, window - 1, -1):
                    try:
                        outs = probe.run(sized_feeds(1, length, 0, {})[0])
                    except ProbeError:
                        continue  # e.g. a position buffer that ends at this length
                    if not _terms_cover(outs, [c for c, *_ in live], terms, reads, length):
                        continue  # a bias buffer (ALiBi's) that ends before this length
                    runs.append((1, length, 0))
                    long_run = length
                    reason = ""
                    break
            if reason:
                for c, *_ in live:
                    self.results[id(c.softmax)] = NoMatch(reason, near=True)
                return
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
                    fixed[id(m)] = pat.astype(bool) if m.dtype == ir.DataType.BOOL else pat.astype(int_dtype(m))
                # Two different token ids: the mask must not depend on them. A third run (when a layer
                # adds a bias) keeps the first one's graph inputs: its bias must not change.
                first: dict[int, np.ndarray] = {}
                input_ids = {id(v) for v in graph_inputs}
                for variant in range(3 if any(terms.values()) else 2):
                    same = {i: a for i, a in first.items() if i in input_ids}
                    feeds, scores, ctxs = sized_feeds(b, s, past, same if variant == 2 else fixed)
                    first = first or feeds
                    outs = probe.run(feeds)
                    k = 0
                    for c, n, d, _ in live:
                        logits = outs[k]
                        merged = outs[k + 1 : k + len(c.merge_chain)]
                        k += len(c.merge_chain)
                        values = list(outs[k : k + len(terms[id(c.softmax)])])
                        k += len(values)
                        read = list(outs[k : k + len(reads[id(c.softmax)])])
                        k += len(read)
                        if variant == 0 and read:
                            shapes[id(c.softmax)].append((b, s, past, read))
                        if id(c.softmax) in per_cand:
                            runs_c = per_cand[id(c.softmax)]
                            if variant == 2:
                                runs_c[-2].terms_other = values
                            else:
                                runs_c.append(MaskRun(feeds, scores[id(c)], logits, values))
                        prev = merge_ok.get(id(c.softmax))
                        if not isinstance(prev, str):
                            merge_ok[id(c.softmax)] = self._merge(c, ctxs[id(c)], merged, b, s, n, d, prev)
            still = []
            for entry in pending:
                c = entry[0]
                verdict = classify_mask(per_cand[id(c.softmax)], [] if m is None else [m])
                own = own_term(c, terms[id(c.softmax)])
                if not isinstance(verdict, MaskVerdict) and own is not None:
                    verdict = (f"{verdict}; with the score bias: %{own.value.name} is computed from the layer's "
                               "output or present keys/values, which the fused op replaces")
                elif not isinstance(verdict, MaskVerdict) and terms[id(c.softmax)]:
                    biased = self._biased(per_cand[id(c.softmax)], [] if m is None else [m], terms[id(c.softmax)])
                    verdict = biased if isinstance(biased, MaskVerdict) else f"{verdict}; with the score bias: {biased}"
                if long_run and not isinstance(verdict, MaskVerdict):
                    # Understood on the short runs, not on the long one (its 2 runs are last): a window.
                    short = classify_mask(per_cand[id(c.softmax)][:-2], [] if m is None else [m])
                    if isinstance(short, MaskVerdict):
                        verdict = (f"a {short.kind} mask on short sequences that blocks more keys at {long_run} "
                                   "positions: a sliding window, which MultiHeadAttention cannot express; kept")
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
            if verdict.bias_inf and verdict.bias_heads and any(n.op_type == "IsNaN" for n in c.nodes):
                self.results[id(c.softmax)] = NoMatch(
                    "a per-head score bias blocks every key of some query rows, which the original zeroes "
                    "behind a NaN guard: the fused op would give NaN there; kept", near=True)
                continue
            if verdict.bias and reads[id(c.softmax)]:
                probed = shapes[id(c.softmax)]
                found = [(v, shape_recipe([(b, s, p, arrs[j]) for b, s, p, arrs in probed]))
                         for j, v in enumerate(reads[id(c.softmax)])]
                verdict = dataclasses.replace(verdict, shape_reads=tuple((v, r) for v, r in found if r is not None))
            out, flat = merged
            self.results[id(c.softmax)] = AttentionMatch(c, n, d, pre * verdict.post_scale, verdict, out, flat,
                                                         kv_heads[id(c.softmax)])

    @staticmethod
    def _biased(runs: list[MaskRun], masks: list[ir.Value], terms: tuple[BiasTerm, ...]) -> MaskVerdict | str:
        """The added terms as the bias and the blocking Wheres as the mask; else every term as the bias."""
        added = tuple(t for t in terms if t.fill is None)
        first = ""
        if added:
            keep = [MaskRun(r.feeds, r.scores, r.logits, r.terms[: len(added)],
                            None if r.terms_other is None else r.terms_other[: len(added)]) for r in runs]
            verdict = classify_biased(keep, masks, added)
            if isinstance(verdict, MaskVerdict) or len(added) == len(terms):
                return verdict
            first = verdict
        verdict = classify_biased(runs, masks, terms)
        return verdict if isinstance(verdict, MaskVerdict) or not first else first

    @staticmethod
    def _layout(
        c: Candidate, x: np.ndarray, ops: tuple[np.ndarray, np.ndarray, np.ndarray], pasts: list[np.ndarray],
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
        if c.q.width != n * d:
            return f"query projection has {c.q.width} columns, not num_heads*head_dim = {n}*{d}"
        kcols, vcols = c.k.width, c.v.width
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
            if path.norm is not None:  # q/k RMSNorm (Qwen3, OLMo-2); MultiHeadAttention gets it in front
                y = path.normed(y, d)
                if isinstance(y, str):
                    return f"the {name} {y}"
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
            if name != "query" and nkv == 1 and got.ndim == 4 and got.shape[1] == 1:
                y = y[:, :1]  # one K/V head that the MatMul broadcasts over the query heads (Falcon)
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
        c: Candidate, ctx: np.ndarray, merged: list[np.ndarray], b: int, s: int, n: int, d: int,
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
