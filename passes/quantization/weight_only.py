"""``quantize-weights``: block-wise weight-only int8/int4, as onnxruntime's ``com.microsoft::MatMulNBits``.

A ``MatMul`` (or ``Gemm``) with a constant 2-D float32 weight ``W [K, N]`` becomes::

    MatMulNBits(A, B, scales, zero_points[, bias]) {K, N, bits, block_size, accuracy_level}

with ``W`` quantized along ``K`` in blocks of ``block_size`` rows, each block of each output column
with its own scale (and zero point unless ``symmetric``). Only the weights are quantized: with
``accuracy_level=4`` onnxruntime's CPU kernel quantizes the activation to int8 *per block* as well
and runs an int8 dot product, which keeps accuracy where a per-tensor activation scale fails, and
the weights shrink 4x (int8) or 8x (int4), which is what matters when a model's weights do not fit
the cache (short sequences, decoding).

The layout (onnxruntime's ``MatMulNBits`` schema, ``weight_prepacked=0``):

* ``B``: uint8 ``[N, k_blocks, blob_size]``, ``k_blocks = ceil(K / block_size)``,
  ``blob_size = block_size * bits / 8``; row ``n`` is column ``n`` of ``W`` (``K`` padded with zeros
  to ``k_blocks * block_size``); 4-bit codes packed two a byte, the first in the low nibble;
* ``scales``: float32 ``[N, k_blocks]``;
* ``zero_points``: uint8 ``[N, ceil(k_blocks * bits / 8)]`` packed as ``B`` (absent when
  ``symmetric``: the kernel's default ``2^(bits-1)``);
* dequantized weight: ``(code - zero_point) * scale``.

A bias ``Add`` of a constant ``[N]`` vector that alone reads the product (or Gemm's ``C``) goes into
the op's ``bias`` input. The rewrite happens only where the target provides ``com.microsoft``
``MatMulNBits``. :func:`pack_weight` and :func:`dequantize_weight` are the math, public for tests.

**Per-op fallback** (``min_cosine > 0``): int4 weights of a whole model can fall out of an accuracy
budget while most ops alone are harmless. Then the pass measures, with the ``quantize`` pass's
machinery (:mod:`passes.quantization.calibration` inputs scored by
:class:`~passes.quantization.sensitivity.Evaluator` against the float model), each op quantized
alone, and keeps the ops whose error is largest at ``fallback`` precision (int8 weights, or float):
the fewest such ops, found by bisection over the ops sorted by their measured error, with which the
combined model (re-measured, not summed) keeps the worst sample's cosine at or above ``min_cosine``.
When int8 fallback of every op is not enough either, the ops are moved to float in the order of
their int8 error, and then as many of the ops left at int8 as the budget allows go back to int4
(the same bisection, by their int4 error). One onnxruntime session on a *switch model* (each op's
precisions behind ``If`` nodes that run-time flags select,
:func:`passes.quantization.forms.build_switch_model`, as the ``quantize`` pass's) measures every
subset; the final rewrite is measured once more. The per-op table goes to the result's ``rows``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

import ir

from ._candidates import MS, Candidate, find_candidates, initializer_array, weight_of
from ._emit import _bias_add, _drop_unused, copy_model
from ..framework.base import Pass, PassContext, PassError, PassResult
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter
from .calibration import calibration_batches
from .forms import Form, build_switch_model, flag_feeds, nbits_form
from .local_error import build_probe_model, local_errors, resolve_ranking
from .sensitivity import Evaluator, release_memory

__all__ = ["WeightOnlyQuantizePass", "PackedWeight", "pack_weight", "dequantize_weight"]


@dataclass(frozen=True)
class PackedWeight:
    """A ``[K, N]`` weight in ``MatMulNBits`` form.

    Attributes:
        b: uint8 ``[N, k_blocks, blob_size]``.
        scales: float32 ``[N, k_blocks]``.
        zero_points: uint8 ``[N, ceil(k_blocks * bits / 8)]``, or ``None`` (symmetric).
        k: rows of the logical weight.
        n: columns of the logical weight.
        bits: 4 or 8.
        block_size: rows per block.
    """

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int
    bits: int
    block_size: int


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes along the last axis, low bits first (8 bits: as they are)."""
    if bits == 8:
        return codes.astype(np.uint8)
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    if pad:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), codes.dtype)], axis=-1)
    c = codes.reshape(codes.shape[:-1] + (-1, per)).astype(np.uint8)
    out = np.zeros(c.shape[:-1], np.uint8)
    for j in range(per):
        out |= (c[..., j] << (bits * j)).astype(np.uint8)
    return out


def pack_weight(w: np.ndarray, *, bits: int = 4, block_size: int = 32, symmetric: bool = False) -> PackedWeight:
    """Quantize ``w [K, N]`` block-wise along ``K`` and pack it for ``MatMulNBits``.

    Asymmetric blocks map ``[min(x, 0), max(x, 0)]`` onto ``0 .. 2^bits - 1`` with a zero point;
    symmetric ones map ``[-max|x|, max|x|]`` onto codes around ``2^(bits-1)`` (the kernel's default
    zero point), with scale ``max|x| / (2^(bits-1) - 1)``.

    Raises:
        PassError: ``bits`` is not 4 or 8, or ``block_size`` is not a power of two >= 16.
    """
    if bits not in (4, 8):
        raise PassError(f"quantize-weights: bits must be 4 or 8, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise PassError(f"quantize-weights: block_size must be a power of two >= 16, not {block_size}")
    k, n = w.shape
    k_blocks = -(-k // block_size)
    wt = np.zeros((n, k_blocks * block_size), np.float32)
    wt[:, :k] = np.asarray(w, np.float32).T
    blocks = wt.reshape(n, k_blocks, block_size).astype(np.float64)
    qmax = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        amax = np.abs(blocks).max(axis=-1)
        scale = amax / (mid - 1)
        scale[scale == 0] = 1.0
        codes = np.clip(np.rint(blocks / scale[..., None]) + mid, 0, qmax)
        zp = None
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scale = (hi - lo) / qmax
        scale[scale == 0] = 1.0
        zpf = np.clip(np.rint(-lo / scale), 0, qmax)
        codes = np.clip(np.rint(blocks / scale[..., None]) + zpf[..., None], 0, qmax)
        zp = _pack_codes(zpf.astype(np.uint8), bits)
    b = _pack_codes(codes.astype(np.uint8), bits)
    return PackedWeight(b, scale.astype(np.float32), zp, k, n, bits, block_size)


def _unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count].astype(np.int32)
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    return np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :count].astype(np.int32)


def dequantize_weight(p: PackedWeight) -> np.ndarray:
    """The float32 ``[K, N]`` weight that ``MatMulNBits`` computes with."""
    n, k_blocks, _ = p.b.shape
    codes = _unpack_codes(p.b, p.bits, p.block_size)  # [N, k_blocks, block_size]
    if p.zero_points is None:
        zp = np.full((n, k_blocks), 1 << (p.bits - 1), np.int32)
    else:
        zp = _unpack_codes(p.zero_points.reshape(n, -1), p.bits, k_blocks)
    w = (codes - zp[..., None]).astype(np.float32) * p.scales.reshape(n, k_blocks)[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, : p.k].T)


#: The fallback precisions by name (weight bits; 0 = float).
_LEVELS = {"int8": 8, "float": 0}


@register_pass
@dataclass(frozen=True)
class WeightOnlyQuantizePass(Pass):
    """Quantize constant MatMul/Gemm weights block-wise to int4/int8 as ``com.microsoft::MatMulNBits``.

    Attributes:
        bits: 4 or 8.
        block_size: weight rows per block (a power of two >= 16).
        accuracy_level: ``MatMulNBits``'s ``accuracy_level``: 4 quantizes activations per block to
            int8 inside the kernel (the fast path on x86 and Arm), 0/1 computes in float.
        symmetric: no zero points (codes centred on ``2^(bits-1)``).
        exclude: node names or op types never to quantize.
        min_weight: weights with fewer elements stay float (tiny projections gain nothing).
        min_cosine: the accuracy budget (worst calibration sample's cosine to the float model);
            0 quantizes every op without measuring (see the module docstring for the fallback).
        fallback: where the ops that break the budget go: ``int8`` (then float if needed) or ``float``.
        calibration: an ``.npz`` of model inputs to measure on (as the ``quantize`` pass).
        tokenizer: a tokenizer folder, with ``texts``, to measure on real text.
        texts: a text file, one sample per line.
        max_calibration: calibration samples to use at most.
        ranking: the order ops move to the fallback in: ``alone`` (each op quantized alone, the model
            scored), ``local`` (each op's relative output error, all from one run of a probe model,
            :mod:`passes.quantization.local_error`) or ``auto`` (``local`` for big models, as
            ``quantize``'s).
        threads: onnxruntime threads while measuring.
    """

    name: ClassVar[str] = "quantize-weights"
    summary: ClassVar[str] = "block-wise weight-only int4/int8 MatMul/Gemm -> com.microsoft MatMulNBits"

    bits: int = 4
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = False
    exclude: tuple[str, ...] = ()
    min_weight: int = 0
    min_cosine: float = 0.0
    fallback: str = "int8"
    calibration: str = ""
    tokenizer: str = ""
    texts: str = ""
    max_calibration: int = 32
    ranking: str = "auto"
    threads: int = 2

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Rewrite every eligible MatMul/Gemm (see the module docstring)."""
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise PassError(f"quantize-weights: accuracy_level must be 0-4, not {self.accuracy_level}")
        if self.fallback not in _LEVELS:
            raise PassError(f"quantize-weights: fallback must be int8 or float, not {self.fallback!r}")
        pack_weight(np.zeros((16, 1), np.float32), bits=self.bits, block_size=self.block_size)  # validates options
        rw = Rewriter()
        if ctx.target is None or not ctx.target.supports("MatMulNBits", MS):
            return rw.result()
        todo = [c for c in find_candidates(model, ("MatMul", "Gemm"), set(self.exclude))
                if c.weight_shape[0] * c.weight_shape[1] >= self.min_weight]
        if not todo:
            return rw.result()
        levels = {c.index: self.bits for c in todo}
        rows: list[dict[str, Any]] = []
        if self.min_cosine > 0:
            levels, rows = self._decide(model, ctx, todo, resolve_ranking(self.name, self.ranking, len(todo), model))
        result = self.apply_levels(model, todo, levels).result()
        result.rows = rows
        return result

    # -- per-op fallback ----------------------------------------------------------------------
    def _decide(self, model: ir.Model, ctx: PassContext, todo: list[Candidate], ranking: str
                ) -> tuple[dict[int, int], list[dict[str, Any]]]:
        """Bits per candidate index (0: float) under ``min_cosine``, and the per-op table."""
        t0 = time.perf_counter()
        calib: Any = None

        def batches(meta: list[Any]) -> Any:  # the evaluator's float session gives the input metadata
            nonlocal calib
            calib = calibration_batches(model, meta, calibration=self.calibration, tokenizer=self.tokenizer,
                                        texts=self.texts, limit=self.max_calibration)
            return calib.batches

        ev = Evaluator(model, batches, threads=self.threads, bar=ctx.bar)
        if calib.generated:
            ctx.note(self.name, "calibration", "no calibration or tokenizer/texts given: deciding on generated "
                     "inputs, which may not show the activation ranges of real data")
        try:
            levels, whole, alone, final = self._measure(model, ctx, todo, ev, calib.source, ranking)
        finally:
            ev.close()
            release_memory()
        counts = Counter(levels.values())
        summary = ", ".join(f"{counts[b]} {'float' if b == 0 else f'int{b}'}" for b in sorted(counts, reverse=True))
        ctx.note(self.name, "model", f"{summary} of {len(todo)} ops; {final if final is not None else whole} "
                 f"(budget {self.min_cosine}) on {calib.source}; {ev.stats.evaluations} measurements in "
                 f"{time.perf_counter() - t0:.1f} s"
                 + ("; ranked by local errors (one probe run)" if ranking == "local" else ""))
        rows = []
        key = "local error" if ranking == "local" else "error"
        for c in todo:
            err = {f"{key} int{b}": round(alone[(c.index, b)], 7) for b in (self.bits, 8) if (c.index, b) in alone}
            b = levels[c.index]
            rows.append({"name": c.name, "op": c.op, "shape": list(c.weight_shape),
                         "decision": "float" if b == 0 else f"int{b}", **err})
        return levels, rows

    def _measure(self, model: ir.Model, ctx: PassContext, todo: list[Candidate], ev: Any, calib_source: str,
                 ranking: str) -> tuple[dict[int, int], Any, dict[tuple[int, int], float], Any]:
        """Levels under the budget, the all-``bits`` score, the errors alone (``1 -`` the worst cosine,
        or with ``ranking=local`` the relative output error) and the final score."""
        lower = _LEVELS[self.fallback] if _LEVELS[self.fallback] > self.bits else 0  # int8 weights: float fallback
        state: dict[str, Any] = {}  # the switch session and its flags

        def open_switch(precisions: list[int]) -> None:
            state.clear()
            release_memory()
            switch, state["flags"] = build_switch_model(model, todo, self._forms(precisions))
            with ev.saved(switch) as source:
                del switch  # its packed weights go before onnxruntime makes its own copy
                state["sess"] = ev.session(source)

        def score(levels: dict[int, int]) -> Any:
            forms = {i: f"int{b}" for i, b in levels.items() if b}
            return ev.score_session(state["sess"], flag_feeds(state["flags"], forms))

        budget = float(self.min_cosine)
        first = {c.index: self.bits for c in todo}
        # The fallback precision joins the switch model only when the whole model misses the budget: a
        # model that holds it never pays for a second copy of its weights (1B Llama: 1.1 GB of int8
        # codes, twice while the session is built).
        open_switch([self.bits])
        whole = score(first)
        ctx.report_progress(f"quantize-weights: all {len(todo)} ops int{self.bits}: {whole}")
        alone: dict[tuple[int, int], float] = {}
        levels = first
        if whole.worst < budget:
            if ranking == "local":  # every op's error at every precision, the switch session released meanwhile
                state.clear()
                alone.update(self._local_errors(model, ctx, todo, ev, [self.bits] + ([lower] if lower else [])))
            if lower or ranking == "local":
                open_switch([self.bits] + ([lower] if lower else []))
            if ranking != "local":
                self._alone(ctx, todo, self.bits, score, alone)
            order = sorted(todo, key=lambda c: -alone[(c.index, self.bits)])  # largest error first
            found = self._fewest(ctx, order, first, lower, score, budget)
            if found is None and lower:  # int8 everywhere still breaks it: then float, worst int8 first
                if ranking != "local":
                    self._alone(ctx, todo, lower, score, alone)
                order = sorted(todo, key=lambda c: -alone[(c.index, lower)])
                found = self._fewest(ctx, order, {c.index: lower for c in todo}, 0, score, budget)
                if found is not None:  # with those in float, the int8 ones back to int<bits> where it holds
                    back = sorted((c for c in todo if found[c.index] == lower),
                                  key=lambda c: -alone[(c.index, self.bits)])
                    found = self._fewest(ctx, back, {**found, **{c.index: self.bits for c in back}}, lower, score,
                                         budget)
            if found is None:
                ctx.note(self.name, "model", f"the budget min_cosine={budget} cannot be met even with every op "
                         f"in float fallback on {calib_source}; the model is left in float")
                levels = {c.index: 0 for c in todo}
            else:
                levels = found
        state.clear()  # the switch model's session holds every op at every precision: release it first
        release_memory()
        final = None
        if any(levels.values()):  # the real rewrite, measured once more
            trial = copy_model(model)
            self.apply_levels(trial, todo, levels)
            final = ev.score_model(trial)
            del trial
            if final.worst < budget:
                ctx.note(self.name, "model", f"the rewritten model measures {final} below the budget "
                         f"{budget} (the switch model measured it inside); the model is left in float")
                levels = {c.index: 0 for c in todo}
        return levels, whole, alone, final

    @staticmethod
    def _alone(ctx: PassContext, todo: list[Candidate], bits: int, score: Any, alone: dict[tuple[int, int], float]
               ) -> None:
        """Each op at ``bits`` alone: its error (``1 -`` the worst cosine) into ``alone``."""
        with ctx.bar(len(todo), f"quantize-weights: ops alone at int{bits}") as bar:
            for i, c in enumerate(todo):
                alone[(c.index, bits)] = 1.0 - score({c.index: bits}).worst
                bar.update()
                if i % 8 == 7:
                    ctx.report_progress(f"quantize-weights: measured {i + 1}/{len(todo)} ops alone at int{bits}")

    def _local_errors(self, model: ir.Model, ctx: PassContext, todo: list[Candidate], ev: Any, precisions: list[int]
                      ) -> dict[tuple[int, int], float]:
        """Each op's relative output error at each of ``precisions``, from one run of the probe model."""
        with ctx.bar(len(ev.batches), "quantize-weights: local errors (probe)") as bar:
            # pre-packed: MatMulNBits applies its accuracy_level to packed weights only
            local = local_errors(ev, lambda: build_probe_model(model, todo, self._forms(precisions)), bar=bar)
        every = list(range(len(ev.batches)))
        return {(i, b): e for b in precisions for i, e in local.relative(every, f"int{b}").items()}

    @staticmethod
    def _fewest(ctx: PassContext, order: list[Candidate], start: dict[int, int], lower: int, score: Any, budget: float
                ) -> dict[int, int] | None:
        """``start`` with the fewest leading ops of ``order`` at ``lower`` that holds the budget (bisection)."""

        def moved(k: int) -> dict[int, int]:
            return {**start, **{c.index: lower for c in order[:k]}}

        # one trial for all ops moved, then a bisection over how many
        with ctx.bar(1 + max(1, len(order)).bit_length(), "quantize-weights: subsets tried") as bar:
            bar.update()
            if score(moved(len(order))).worst < budget:
                return None
            lo, hi = 0, len(order)  # moved(hi) holds
            while lo < hi:
                mid = (lo + hi) // 2
                ok = score(moved(mid)).worst >= budget
                bar.update()
                if ok:
                    hi = mid
                else:
                    lo = mid + 1
            return moved(hi)

    def _forms(self, precisions: list[int]) -> dict[str, Form]:
        """The MatMulNBits forms at ``precisions``, named ``int<bits>`` (the switch's and the probe's)."""
        return {f"int{b}": nbits_form(self, b) for b in precisions}

    # -- the rewrite --------------------------------------------------------------------------
    def _nbits(self, graph: ir.Graph, rw: Rewriter, x: ir.Value, w: np.ndarray, bias: np.ndarray | None, bits: int,
               base: str, out_type: ir.Type | None, *, before: ir.Node | None = None, after: ir.Node | None = None,
               into: ir.Graph | None = None) -> ir.Node:
        """A new ``MatMulNBits`` computing ``x @ w (+ bias)`` with ``w`` quantized to ``bits``.

        The node goes before ``before``, after ``after`` or at the end of ``into``; its constants into ``graph``.
        """
        k, n = w.shape
        p = pack_weight(w, bits=bits, block_size=self.block_size, symmetric=self.symmetric)
        inputs: list[ir.Value | None] = [
            x,
            rw.constant(graph, p.b, name=f"{base}_w_q{bits}"),
            rw.constant(graph, p.scales, name=f"{base}_w_scales"),
            None if p.zero_points is None else rw.constant(graph, p.zero_points, name=f"{base}_w_zero_points"),
        ]
        if bias is not None:
            inputs += [None, rw.constant(graph, np.ascontiguousarray(bias, np.float32), name=f"{base}_bias")]
        while inputs[-1] is None:
            inputs.pop()
        attrs = {"K": k, "N": n, "bits": bits, "block_size": self.block_size, "accuracy_level": self.accuracy_level}
        return rw.make("MatMulNBits", inputs, attrs, before=before, after=after, graph=into, domain=MS,
                       name=f"{base}_nbits",
                       output_names=[f"{base}_out"], types=[out_type])

    def apply_levels(self, model: ir.Model, todo: list[Candidate], levels: dict[int, int]) -> Rewriter:
        """Rewrite each candidate of ``todo`` in ``model`` to ``MatMulNBits`` at ``levels[index]`` bits
        (0: left float); the rewriter that did it (its stats count the ops)."""
        rw = Rewriter()
        nodes = list(model.graph)
        for c, node in [(c, nodes[c.index]) for c in todo]:  # indices shift as nodes are inserted
            bits = levels[c.index]
            if bits:
                self._rewrite(model.graph, rw, node, c.op, bits)
                rw.count(f"{c.op} -> MatMulNBits ({bits}-bit)")
            else:
                rw.count("kept float")
        if any(levels.values()):
            rw.import_opset(model, MS)
        return rw

    def _rewrite(self, graph: ir.Graph, rw: Rewriter, node: ir.Node, op: str, bits: int) -> None:
        w, bias = weight_of(node)  # type: ignore[misc]
        n = w.shape[1]
        replaced, erase = node.outputs[0], [node]
        old = [v for v in node.inputs[1:] if v is not None]
        if bias is None and op == "MatMul":
            add = _bias_add(node, n)
            if add is not None:
                other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
                bias = initializer_array(other).reshape(-1)  # type: ignore[union-attr]
                replaced, erase = add.outputs[0], [add, node]
                old.append(other)  # type: ignore[arg-type]
        assert replaced is not None and node.inputs[0] is not None
        new = self._nbits(graph, rw, node.inputs[0], w, bias, bits, node.name or replaced.name, replaced.type,
                          before=node)
        rw.replace_all_uses_with(replaced, new.outputs[0])
        rw.erase(erase)
        for v in old:
            _drop_unused(graph, rw, v)
