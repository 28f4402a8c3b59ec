"""``quantize``: per-op int8 quantization of weights under an accuracy budget.

What it does, in order:

1. **Candidates** come from the target's :class:`~targets.QuantPolicy`: ``MatMul`` and ``Gemm`` with a
   constant 2-D float weight, and ``com.microsoft::Attention`` (packed ``[H, 3H]`` QKV weight).
   Names or op types in the ``exclude`` option are skipped.
2. **Calibration** inputs (see :mod:`passes.quantization.calibration`): an ``.npz``, real text through the
   model's tokenizer, or generated inputs (with a warning).
3. **Remedies** for activation outliers are tried on the fully quantized model and the best one is
   kept: plain per-channel weights, and SmoothQuant equalization of the activations read from a
   LayerNormalization-like op (``s = max|x|^a / max|w|^(1-a)``; folded into gamma/beta when the
   quantized ops are the only readers, else a ``Mul`` by ``1/s`` in front of them), and, for
   MatMul/Gemm activations not smoothed (e.g. GELU outputs), LLM.int8()-style outlier channels: the
   few channels with a calibration ``max|x|`` far above the rest are zeroed in the quantized path
   (``Mul`` by a 0/1 mask) and computed in float (``Gather`` + small ``MatMul``, then ``Add``).
4. **Sensitivity**: each candidate is quantized alone and the model scored against the float one
   (:mod:`passes.quantization.sensitivity`); for big models (``ranking=auto``) each op's local error
   instead, all from one run of a probe model (:mod:`passes.quantization.local_error`). Candidates
   are then quantized in order of accuracy lost per multiply-add moved to int8 (``K*N``, a proxy for
   the time saved) while the combined model (re-measured, not summed) keeps the worst sample's
   cosine at or above ``min_cosine`` (and, with ``min_mean_cosine``, the mean cosine at or above
   that); the others stay float, or with ``fallback=nbits`` go to block-wise weight-only
   ``MatMulNBits`` (8-bit, or 4 with ``fallback_bits=4``) as far as the same budget and search
   allow. If not even one op fits, the model stays float and a note says so. Screening keeps this
   cheap: the ops alone are ranked, and every subset tried is first checked, on the few calibration
   batches the fully quantized model does worst on (``screen_fraction``); a subset that misses the
   budget there misses it on the full set (a worst over fewer samples is never lower), so only those
   that pass are measured on every batch.
   With ``static`` the remedies are also tried with static activation scales from calibration
   (:mod:`passes.quantization.static_scales`), measured the same way.
5. **Rewrite** by ``policy.format``:

   * ``integer-ops``: ``com.microsoft::DynamicQuantizeMatMul(A, B_q, b_scale, b_zero_point, bias)``
     (a following bias ``Add`` is folded in); when one activation feeds several quantized ops, one
     ``DynamicQuantizeLinear`` feeds ``MatMulIntegerToFloat`` / ``QAttention`` nodes;
   * ``qdq``: ``DynamicQuantizeLinear -> DequantizeLinear`` on the activation and
     ``DequantizeLinear(B_q, scale, zero_point, axis)`` on the weight, around the float ``MatMul``:
     standard ONNX any runtime runs.

The per-op table goes to the result's ``rows`` (a list of dicts); counters go to the
pass result's stats.

This module holds the pass and its decisions (steps 3 and 4); the candidates are found in
:mod:`passes.quantization._candidates` and the rewrites written by :mod:`passes.quantization._emit`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np

import ir

from ._candidates import MS, NORM_OPS, Candidate, find_candidates, weight_of
from ._emit import Plan, apply_plan, copy_model
from ..framework.base import Pass, PassContext, PassError, PassResult
from .budget import Budget, Gap, cross_validated_gap
from .calibration import calibration_batches
from .forms import build_switch_model, flag_feeds, quantize_forms
from .local_error import LocalErrors, build_probe_model, local_errors, resolve_ranking
from .quant_math import WEIGHT_CLIPS, outlier_channels, smooth_factors, weight_clipping
from ..framework.numerics import FILE_BYTES, tensor_bytes
from .sensitivity import Evaluator, Score, release_memory
from .static_scales import ChannelRanges, channel_ranges, static_qparams
from .subset_search import LOCAL_ADDITION_ROUNDS, grow, macs
from .weight_only import WeightOnlyQuantizePass
from ..framework.registry import register_pass

__all__ = ["QuantizePass", "find_candidates", "Candidate", "Plan", "apply_plan", "Budget", "Gap",
           "cross_validated_gap"]


#: The bits ``fallback=nbits`` may write its ops at.
FALLBACK_BITS = (8, 4)


def nbits_writer(bits: int) -> WeightOnlyQuantizePass:
    """The writer of ``fallback=nbits``'s ops: ``bits``-bit block-wise MatMulNBits, activations
    quantized per block of 32 (``accuracy_level=4``)."""
    return WeightOnlyQuantizePass(bits=bits, block_size=32, accuracy_level=4)


@register_pass
@dataclass(frozen=True)
class QuantizePass(Pass):
    """Quantize MatMul/Gemm/Attention weights to int8 where the accuracy budget allows.

    Attributes:
        min_cosine: the budget: the worst calibration sample's cosine to the float model.
        min_mean_cosine: a second budget beside it: the mean cosine over the calibration samples
            (``0``: none). A decision holds both: a loose worst with a tight mean lets the ops whose
            error shows on a few samples only go int8 while the typical sample stays exact.
        exclude: node names or op types never to quantize.
        calibration: an ``.npz`` of model inputs to calibrate on.
        tokenizer: a tokenizer folder, with ``texts``, to calibrate on real text.
        texts: a text file, one sample per line.
        per_channel: per-output-channel weight scales; ``None`` follows the target's policy.
        reduce_range: 7-bit weights; ``None`` follows the target's policy.
        max_calibration: calibration samples to use at most.
        smooth: SmoothQuant: ``auto`` (try it, keep it when it measures better), ``on``, ``off``.
        smooth_alphas: migration strengths ``a`` tried.
        outliers: LLM.int8()-style outlier channels kept float for MatMul/Gemm activations not
            smoothed: ``auto`` (try it, keep it when it measures better), ``on``, ``off``.
        outlier_threshold: a channel is an outlier when its calibration ``max|x|`` exceeds this
            many times the level of the channels past the budget (see
            :func:`passes.quantization.quant_math.outlier_channels`).
        outlier_fraction: the largest fraction of an activation's channels kept float.
        fallback: where the ops the budget keeps out of int8 go: ``float``, or ``nbits``
            (block-wise weight-only ``MatMulNBits`` with ``accuracy_level=4``, where the target
            provides it; MatMul/Gemm only): after the int8 set is chosen, the other ops are moved to
            it under the same budget and search, and those that still break it stay float.
        fallback_bits: the weight bits of ``fallback=nbits``: 8, or 4 (half the weight bytes, for a
            model bound by streaming its weights; the larger weight error fits the budget on fewer
            ops: on MiniLM at worst 0.997, on none).
        static: static activation scales from calibration (a ``QuantizeLinear`` with constant scale
            and zero point instead of the per-call ``DynamicQuantizeLinear``, see
            :mod:`passes.quantization.static_scales`): ``off``; ``auto`` (the best dynamic remedy is
            also tried with static scales at each of ``static_clips``, and the form that measures
            better is kept); ``on`` (every remedy with static scales only).
        static_clips: the percentiles of each channel's calibration values its static range covers
            (100: min/max).
        margin: ``cv`` (default): the budget the search holds on the calibration samples is
            tightened by the gap between calibration and unseen samples, estimated by 2-fold
            cross-validation over the calibration batches (:func:`cross_validated_gap`: the search
            decides on one half and its decision is scored on the other; static scales are fitted
            again on the half that decides), the mean of the two folds' gaps; ``cv-max``: the larger
            of the two (fewer ops int8, held on unseen samples more often: ``--autotune`` uses it,
            since keeping the fastest of several forms that pass on calibration favours the form
            whose gap was most underestimated; on MiniLM's held-out sentences 3 of its 5 int8 forms
            missed the worst-sentence budget with ``cv``, none with ``cv-max``); ``off``: the budget
            as given.
        weight_clip: the weight scales: ``minmax`` (``max|w|`` maps to the top level) or ``mse``
            (per channel, the clipped range of least squared weight error,
            :func:`passes.quantization.quant_math.clip_ratios`).
        sensitivity: measure each op and keep the sensitive ones float (``False``: quantize every
            candidate without measuring anything).
        ranking: the order the search tries ops in: ``alone`` (each op quantized alone, the whole model
            scored: one evaluation an op) or ``local`` (each op's relative output error on its float
            input, every op from one run of a probe model, :mod:`passes.quantization.local_error`:
            about two evaluations in all; the additions after the first bisection are then
            :data:`LOCAL_ADDITION_ROUNDS` more bisections, not a trial an op); ``auto``: ``local``
            when the candidates times the model's tensor bytes exceed
            :data:`~passes.quantization.local_error.LOCAL_RANKING_BYTES`, else ``alone``. The search
            measures every subset it keeps end to end either way; ``alone`` ranks better (MiniLM, real
            sentences, budget 0.997 with ``margin=cv-max``: 12 ops int8 in 128 measurements against
            10 in 67, both within the budget on held-out sentences).
        screen_fraction: measure each op alone, and screen every subset tried, on this fraction of
            the calibration batches (those the fully quantized model does worst on, at least one);
            a subset is measured on all batches only when it passes the screen. ``0``: every
            measurement on all batches.
        calibration_batch: samples per calibration batch. Activation scales are per call, so a
            padded batch quantizes each sentence with a range its padding shares: calibrate at the
            batch size the model will serve (``--autotune`` uses its timing batch).
        threads: onnxruntime threads while measuring.
    """

    name: ClassVar[str] = "quantize"
    summary: ClassVar[str] = "int8 weights per op under an accuracy budget (dynamic activations)"

    min_cosine: float = 0.999
    min_mean_cosine: float = 0.0
    exclude: tuple[str, ...] = ()
    calibration: str = ""
    tokenizer: str = ""
    texts: str = ""
    # Optional[...] rather than ``bool | None``: the pipeline parser reads typing.Union options.
    per_channel: Optional[bool] = None  # noqa: UP007
    reduce_range: Optional[bool] = None  # noqa: UP007
    max_calibration: int = 128
    smooth: str = "auto"
    smooth_alphas: tuple[float, ...] = (0.5, 0.7)
    outliers: str = "auto"
    outlier_threshold: float = 2.0
    outlier_fraction: float = 0.02
    fallback: str = "float"
    fallback_bits: int = 8
    static: str = "off"
    static_clips: tuple[float, ...] = (100.0, 99.99)
    margin: str = "cv"
    weight_clip: str = "mse"
    sensitivity: bool = True
    ranking: str = "auto"
    screen_fraction: float = 0.15
    calibration_batch: int = 8
    threads: int = 2

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Choose the ops to quantize under the budget, then rewrite them."""
        from targets import QuantPolicy

        policy = ctx.target.quantization if ctx.target is not None else QuantPolicy()
        if policy.activations != "dynamic":
            raise PassError(f"quantize: activations={policy.activations!r} is not supported (only dynamic)")
        if policy.format not in ("integer-ops", "qdq"):
            raise PassError(f"quantize: unknown quantization format {policy.format!r}")
        if self.smooth not in ("auto", "on", "off"):
            raise PassError(f"quantize: smooth must be auto, on or off, not {self.smooth!r}")
        if self.outliers not in ("auto", "on", "off"):
            raise PassError(f"quantize: outliers must be auto, on or off, not {self.outliers!r}")
        if self.static not in ("auto", "on", "off"):
            raise PassError(f"quantize: static must be auto, on or off, not {self.static!r}")
        if self.fallback not in ("float", "nbits"):
            raise PassError(f"quantize: fallback must be float or nbits, not {self.fallback!r}")
        if self.fallback_bits not in FALLBACK_BITS:
            raise PassError(f"quantize: fallback_bits must be one of {', '.join(map(str, FALLBACK_BITS))}, "
                            f"not {self.fallback_bits!r}")
        ops = tuple(o for o in policy.ops if policy.format == "integer-ops" or o != "Attention")
        exclude = set(self.exclude)
        min_cos = float(self.min_cosine)
        report: list[dict[str, Any]] = []
        candidates = find_candidates(model, ops, exclude)
        if not candidates:
            return PassResult(False)
        base = Plan(
            frozenset(c.index for c in candidates),
            per_channel=policy.per_channel if self.per_channel is None else self.per_channel,
            reduce_range=policy.reduce_range if self.reduce_range is None else self.reduce_range,
            signed=policy.weight_signed,
            format=policy.format,
        )
        if self.margin not in ("cv", "cv-max", "off"):
            raise PassError(f"quantize: margin must be cv, cv-max or off, not {self.margin!r}")
        ranking = resolve_ranking(self.name, self.ranking, len(candidates), model)
        if self.weight_clip not in WEIGHT_CLIPS:
            raise PassError(f"quantize: weight_clip must be one of {', '.join(WEIGHT_CLIPS)}, not {self.weight_clip!r}")
        if not self.sensitivity:
            with weight_clipping(self.weight_clip):
                rw = apply_plan(model, candidates, base)
            for c in candidates:
                report.append({"name": c.name, "op": c.op, "shape": list(c.weight_shape), "decision": "quantized",
                               "error": None, "smoothed": False})
            return _with_rows(rw.result(), report)
        # the fallback's MatMulNBits writer, when there is one
        nbits = nbits_writer(self.fallback_bits) if self.fallback == "nbits" and ctx.target is not None \
            and ctx.target.supports("MatMulNBits", MS) and any(c.op != "Attention" for c in candidates) else None
        plan, errors = self._decide(model, ctx, candidates, base, min_cos, ranking, nbits)
        error_key = "local error" if ranking == "local" else "error"
        for c in candidates:
            err = errors.get(c.index)
            report.append({
                "name": c.name, "op": c.op, "shape": list(c.weight_shape),
                "decision": "quantized" if c.index in plan.chosen else (
                    f"weight-only int{self.fallback_bits} (MatMulNBits)" if c.index in plan.nbits else "kept float"),
                error_key: None if err is None else round(err, 7),
                "smoothed": c.activation in plan.smooth and c.index in plan.chosen,
            })
        if not plan.chosen and not plan.nbits:
            return PassResult(False, stats=Counter({"kept float": len(candidates)}), rows=report)
        with weight_clipping(self.weight_clip):
            rw = apply_plan(model, candidates, plan, nbits)
        rw.count("kept float", len(candidates) - len(plan.chosen) - len(plan.nbits))
        smoothed = {c.activation for c in candidates if c.index in plan.chosen and c.activation in plan.smooth}
        if smoothed:
            rw.count("smoothed activations", len(smoothed))
        return _with_rows(rw.result(), report)

    # -- decisions ------------------------------------------------------------------------
    def _decide(
        self, model: ir.Model, ctx: PassContext, candidates: list[Candidate], base: Plan, min_cos: float,
        ranking: str, nbits: WeightOnlyQuantizePass | None,
    ) -> tuple[Plan, dict[int, float]]:
        """The plan the budget allows (``nbits``: the fallback's MatMulNBits writer, if any), and each
        op's error alone (``1 -`` its worst cosine quantized alone; with ``ranking=local`` its relative
        output error) where measured."""
        t0 = time.perf_counter()
        budget = Budget(min_cos, float(self.min_mean_cosine))
        calib: Any = None

        def batches(meta: list[Any]) -> Any:  # the evaluator's float session gives the input metadata
            nonlocal calib
            calib = calibration_batches(model, meta, calibration=self.calibration, tokenizer=self.tokenizer,
                                        texts=self.texts, limit=self.max_calibration, batch=self.calibration_batch)
            ctx.report_progress(f"quantize: {len(candidates)} candidates, calibrating on {calib.source}")
            return calib.batches

        ev = Evaluator(model, batches, threads=self.threads, bar=ctx.bar)
        if calib.generated:
            ctx.note(self.name, "calibration", "no --calibration or --tokenizer/--texts given: deciding on generated "
                     "inputs, which may not show the activation ranges of real data")

        # 1. remedies for activation outliers, each measured on the fully quantized model
        variants = self._variants(model, ev, candidates, base)
        all_on = {c.index: "int8" for c in candidates}
        best: tuple[str, Plan, Any, dict[tuple[int, str], str], Score] | None = None

        # A switch session holds the model twice; a big model's best one is not kept while the next
        # is built (two at once: 11 GB for a 1B decoder) but built again after (see switch_session).
        keep_best = tensor_bytes(model) <= FILE_BYTES

        def switch_session(vplan: Plan) -> tuple[Any, dict[tuple[int, str], str]]:
            with weight_clipping(self.weight_clip):
                switch, flags = build_switch_model(model, candidates, quantize_forms(vplan, nbits))
            with ev.saved(switch) as source:
                del switch  # its quantized weights go before onnxruntime makes its own copy
                return ev.session(source), flags

        def measure(variants: list[tuple[str, Plan]]) -> None:
            nonlocal best
            with ctx.bar(len(variants), "quantize: remedies") as bar:
                for vname, vplan in variants:
                    if best is not None and not keep_best:
                        best = (*best[:2], None, *best[3:])
                    release_memory()
                    sess, flags = switch_session(vplan)
                    s = ev.score_session(sess, flag_feeds(flags, all_on))
                    ctx.report_progress(f"quantize: all {len(candidates)} ops int8 with {vname}: {s}")
                    if best is None or budget.slack(s) > budget.slack(best[4]):
                        best = (vname, vplan, sess, flags, s)
                    del sess  # a switch session holds the model twice: keep the best one only
                    release_memory()
                    bar.update()

        if self.static != "on":
            measure(variants)
        acts = sorted({c.activation for c in candidates})
        # a static variant's plan without its scales and its clip, by name: the scales are fitted on
        # calibration data, and the cross-validation below fits them again on each fold's batches
        static_of: dict[str, tuple[Plan, float]] = {}
        if self.static != "off":
            ranges = _channel_ranges(model, ev, acts, tuple(self.static_clips))
            tried = variants if self.static == "on" else [(best[0], best[1])]  # type: ignore[index]
            static_of = {f"{vname} + static scales (clip {clip:g})": (vplan, clip)
                         for vname, vplan in tried for clip in self.static_clips}
            measure([(name, _with_static(vplan, ranges[clip])) for name, (vplan, clip) in static_of.items()])
        assert best is not None
        best_name, plan, sess, flags, all_score = best
        best = None
        local: LocalErrors | None = None
        if ranking == "local":
            if not keep_best:  # the probe holds the model and every form too: not beside a switch session
                sess = None  # (the last remedy's, when it won: a 1.1 B Llama's probe phase then held 17.5 GB)
            local = self._local_errors(model, ev, ctx, candidates, plan, nbits)
        if sess is None:
            release_memory()
            sess, flags = switch_session(plan)

        # Screening: the batches the fully quantized model does worst on. The worst over a subset is
        # never below the worst over all batches, so a subset that misses the worst budget settles a
        # trial for the full set; only trials that pass it are measured on every batch (the mean
        # has no such bound, so it is checked on every batch only).
        def score(forms: dict[int, str], on: Evaluator = ev, switch: tuple[Any, dict] | None = None) -> Score:
            s, f = (sess, flags) if switch is None else switch
            return on.score_session(s, flag_feeds(f, forms))

        def search(on: Evaluator, batches: list[int], budget: Budget, label: str = "",
                   switch: tuple[Any, dict] | None = None) -> tuple[dict[int, str], dict[int, float], dict[int, float]]:
            """The forms the budget allows, decided on the batches ``batches`` of ``ev`` (``on``) through
            the switch session (``switch``: another one than the plan's, as ``(session, flags)``), and
            the int8 and nbits errors alone it ranked the ops by."""
            def scored(forms: dict[int, str], on: Evaluator = ev) -> Score:
                return score(forms, on, switch)

            n_hard = math.ceil(self.screen_fraction * len(batches))
            hard, ranked_on = None, batches
            if 0 < n_hard < len(batches) and len(all_score.batch_worst) == len(ev.batches):
                ranked_on = sorted(sorted(batches, key=lambda b: all_score.batch_worst[b])[:n_hard])
                hard = ev.subset(ranked_on)

            def fits(forms: dict[int, str]) -> bool:
                if hard is not None and scored(forms, hard).worst < budget.worst:
                    return False
                return budget.holds(scored(forms, on))

            def errors_alone(pool: list[Candidate], form: str, start: dict[int, str], what: str) -> dict[int, float]:
                """Each op's error in ``form`` (the others as in ``start``): measured alone, or local."""
                if local is not None:
                    return local.relative(ranked_on, form)
                errs = {}
                with ctx.bar(len(pool), f"quantize: {what}{label}") as bar:
                    for i, c in enumerate(pool):
                        errs[c.index] = 1.0 - scored({**start, c.index: form}, hard or on).worst
                        bar.update()
                        if i % 12 == 11:
                            ctx.report_progress(f"quantize: measured {i + 1}/{len(pool)} {what}{label}")
                return errs

            def order(pool: list[Candidate], errs: dict[int, float]) -> list[Candidate]:
                """The ops by error per multiply-add moved (the speed-up of an op is about proportional
                to its weight's ``K*N`` per token); measured alone, only those that alone hold the budget."""
                ranked = sorted(pool, key=lambda c: (max(errs[c.index], 1e-9) / macs(c), errs[c.index]))
                return ranked if local is not None else [c for c in ranked if errs[c.index] <= 1.0 - budget.worst]

            if budget.holds(scored(all_on, on) if on is not ev else all_score):
                return dict(all_on), {}, {}
            # 2. the ranking: each op alone (on the hardest batches when screening), or local errors
            errs = errors_alone(candidates, "int8", {}, "ops alone")
            rounds = LOCAL_ADDITION_ROUNDS if local is not None else None
            forms = grow({}, order(candidates, errs), "int8", fits, ctx.bar, rounds)
            # 3. the ops left float: weight-only MatMulNBits under the same budget and search
            rest = [] if nbits is None else [c for c in candidates if c.index not in forms and c.op != "Attention"]
            nb_errs: dict[int, float] = {}
            if rest:
                with_rest = {**forms, **{c.index: "nbits" for c in rest}}
                if fits(with_rest):
                    forms = with_rest
                else:
                    nb_errs = errors_alone(rest, "nbits", forms, "ops alone in nbits")
                    forms = grow(forms, order(rest, nb_errs), "nbits", fits, ctx.bar, rounds)
            return forms, errs, nb_errs

        everything = list(range(len(ev.batches)))
        if self.margin != "off" and len(ev.batches) >= 4:
            # The calibration-to-held-out gap: decide on one half of the batches, score that decision
            # on the other half, both ways; the budget is tightened by the optimism measured (margin=cv: the
            # folds' mean; cv-max: the larger).
            # A plan with static scales decides each fold through a switch model with scales fitted on
            # that fold's batches only: scales fitted on every batch would see the other fold's
            # activations, and the gap would miss how far unseen activations fall outside them (on a
            # VNNI host MiniLM's static form held 0.9975 on calibration, 0.9954 on held-out sentences).
            refit = static_of.get(best_name) if plan.static else None

            def decide(part: list[int], b: Budget) -> tuple[dict[int, str], tuple[Any, dict] | None]:
                switch = None
                if refit is not None:
                    vplan, clip = refit
                    switch = switch_session(_with_static(vplan, _channel_ranges(model, ev.subset(part), acts,
                                                                                 (clip,))[clip]))
                return search(ev.subset(part), part, b, " (fold)", switch)[0], switch

            gap = cross_validated_gap(everything, decide, lambda d, part: score(d[0], ev.subset(part), d[1]), budget,
                                      reduce="max" if self.margin == "cv-max" else "mean")
            ctx.report_progress(f"quantize: cross-validated calibration gap {gap}")
            budget = budget.tightened(gap)
            margin_note = f"; budget tightened by the cross-validated gap {gap} to {budget}"
        else:
            margin_note = ""
        hard = ev.hardest(all_score, math.ceil(self.screen_fraction * len(ev.batches)))
        forms, errs, nb_errs = search(ev, everything, budget)
        del sess  # measured: the switch session goes before the real rewrite's is built
        release_memory()
        # 4. the real rewrite, measured once more (the switch model is a faithful stand-in, but check)
        final: Score | None = None
        alone = {**nb_errs, **errs}
        while forms:
            trial = copy_model(model)
            with weight_clipping(self.weight_clip):
                apply_plan(trial, candidates, _with_forms(plan, forms), nbits)
            final = ev.score_model(trial)
            if budget.holds(final):
                break
            del forms[max(forms, key=lambda i: alone.get(i, 0.0))]
            final = None
        seconds = time.perf_counter() - t0
        if not forms:
            least = f"the least sensitive op alone gives worst cosine {1.0 - min(errs.values()):.6f}" \
                if errs and local is None else f"all ops int8 give {all_score}"
            ctx.note(self.name, "model", f"the budget {budget} cannot be met: {least} on {calib.source}; "
                     "the model is left in float")
            return _with_forms(plan, {}), errs
        n_int8 = sum(1 for f in forms.values() if f == "int8")
        n_nbits = len(forms) - n_int8
        ctx.note(self.name, "model", f"{n_int8}/{len(candidates)} ops int8 ({best_name}), "
                 + (f"{n_nbits} weight-only int{self.fallback_bits} (MatMulNBits), " if n_nbits else "")
                 + f"{len(candidates) - len(forms)} kept float; {final} (budget {budget}) on {calib.source}; "
                 f"{ev.stats.evaluations} measurements ({ev.stats.batches} batches"
                 f"{f', screening on {len(hard.batches)} of {len(ev.batches)}' if hard is not None else ''}) "
                 f"in {seconds:.1f} s{margin_note}"
                 + (f"; ranked by local errors ({len(candidates)} ops, one probe run)" if local is not None else ""))
        return _with_forms(plan, forms), errs

    def _local_errors(self, model: ir.Model, ev: Evaluator, ctx: PassContext, candidates: list[Candidate], plan: Plan,
                      nbits: WeightOnlyQuantizePass | None) -> LocalErrors:
        """Every op's local error in each form (``ranking=local``), from one run of the probe model."""
        def build() -> tuple[ir.Model, dict[tuple[int, str], str]]:
            with weight_clipping(self.weight_clip):
                return build_probe_model(model, candidates, quantize_forms(plan, nbits))

        with ctx.bar(len(ev.batches), "quantize: local errors (probe)") as bar:
            # Unpacked weights: the probe holds the float model and every int8 weight, and pre-packed
            # copies of them all would be twice that (a 1.1 B Llama: ~11 GB); it moves int8 errors by
            # under 0.2%, a ranking's noise. MatMulNBits needs its packing.
            return local_errors(ev, build, prepack=nbits is not None, bar=bar)

    def _variants(self, model: ir.Model, ev: Evaluator, candidates: list[Candidate], base: Plan
                  ) -> list[tuple[str, Plan]]:
        """The remedies to try: SmoothQuant on normalized activations, outlier channels on the others."""
        kind = "per-channel" if base.per_channel else "per-tensor"
        smooth_groups = _smooth_groups(model, candidates) if self.smooth != "off" else {}
        outlier_acts = sorted({c.activation for c in candidates if c.op != "Attention"}) \
            if self.outliers != "off" and self.outlier_threshold > 0 else []
        # an activation read by an Attention keeps its quantizer whole (QAttention reads it directly)
        shared_with_attention = {c.activation for c in candidates if c.op == "Attention"}
        # (graph inputs are left out: the probe model reads intermediate values only)
        produced = {o.name for n in model.graph for o in n.outputs if o is not None}
        outlier_acts = [a for a in outlier_acts if a not in shared_with_attention and a in produced]
        absmax = _activation_absmax(model, ev, sorted(set(smooth_groups) | set(outlier_acts)))
        nodes = list(model.graph)

        def outliers(skip: set[str]) -> dict[str, np.ndarray]:
            out = {}
            for act in outlier_acts:
                if act in skip:
                    continue
                idx = outlier_channels(absmax[act], self.outlier_threshold, self.outlier_fraction)
                if len(idx):
                    out[act] = idx
            return out

        plain = outliers(set())
        variants: list[tuple[str, Plan]] = []
        if self.smooth != "on":
            if self.outliers != "on" or not plain:
                variants.append((kind, base))
            if plain:
                n = sum(len(v) for v in plain.values())
                variants.append((f"{kind} + {n} outlier channels", dataclasses.replace(base, outliers=plain)))
        for alpha in self.smooth_alphas if smooth_groups else ():
            factors = {}
            for act, members in smooth_groups.items():
                w_absmax = np.max([np.abs(weight_of(nodes[c.index])[0]).max(axis=1)  # type: ignore[index]
                                   for c in members], axis=0)
                factors[act] = smooth_factors(absmax[act], w_absmax, alpha)
            rest = outliers(set(factors))
            name = f"{kind} + SmoothQuant a={alpha}"
            if self.outliers != "on" or not rest:
                variants.append((name, dataclasses.replace(base, smooth=factors)))
            if rest:
                n = sum(len(v) for v in rest.values())
                variants.append((f"{name} + {n} outlier channels", dataclasses.replace(base, smooth=factors, outliers=rest)))
        return variants or [(kind, base)]


def _with_forms(plan: Plan, forms: dict[int, str]) -> Plan:
    return dataclasses.replace(plan, chosen=frozenset(i for i, f in forms.items() if f == "int8"),
                               nbits=frozenset(i for i, f in forms.items() if f == "nbits"))


def _smooth_groups(model: ir.Model, candidates: list[Candidate]) -> dict[str, list[Candidate]]:
    """Candidates by activation, for activations produced by a LayerNormalization-like op."""
    nodes = list(model.graph)
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        x = nodes[c.index].inputs[0]
        p = x.producer() if x is not None else None
        if p is not None and (p.domain, p.op_type) in NORM_OPS and x.index() == 0:  # type: ignore[union-attr]
            groups.setdefault(c.activation, []).append(c)
    return groups


def _with_static(plan: Plan, ranges: dict[str, ChannelRanges]) -> Plan:
    """``plan`` with static activation scales from the calibration ``ranges`` (after its smoothing
    and outlier channels)."""
    return dataclasses.replace(plan, static={act: static_qparams(r, plan.smooth.get(act), plan.outliers.get(act))
                                             for act, r in ranges.items()})


def _channel_ranges(model: ir.Model, ev: Evaluator, names: list[str], clips: tuple[float, ...]
                    ) -> dict[float, dict[str, ChannelRanges]]:
    """Per-channel calibration ranges of the activations ``names`` (graph inputs read from the feeds)."""
    m = copy_model(model)
    by_name = {o.name: o for n in m.graph for o in n.outputs if o is not None}
    present = {v.name for v in m.graph.outputs}
    m.graph.outputs.extend(by_name[n] for n in names if n in by_name and n not in present)
    sess = ev.session_of(m)
    del m

    def run(wanted: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        produced = [n for n in wanted if n in by_name]
        got = dict(zip(produced, sess.run(produced, feeds)))
        return [got[n] if n in got else feeds[n] for n in wanted]

    try:
        return channel_ranges(ev.batches, run, names, clips, ev.mask_name)
    except ValueError as e:
        raise PassError(f"quantize: static_clips: {e}") from None


def _activation_absmax(model: ir.Model, ev: Evaluator, names: list[str]) -> dict[str, np.ndarray]:
    m = copy_model(model)
    by_name = {o.name: o for n in m.graph for o in n.outputs if o is not None}
    present = {v.name for v in m.graph.outputs}
    m.graph.outputs.extend(by_name[n] for n in names if n not in present)
    return ev.activation_absmax(m, names)


def _with_rows(result: PassResult, rows: list[dict[str, Any]]) -> PassResult:
    result.rows = rows
    return result
