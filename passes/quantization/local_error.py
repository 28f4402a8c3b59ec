"""Local sensitivity: every candidate's own output error in its quantized forms, from one pass over the batches.

``quantize`` and ``quantize-weights`` rank their candidates before their searches (which ops to try
quantized first, or to move back first). ``ranking=alone`` measures each op quantized alone, end to
end: one model evaluation an op, faithful, but on a 1B decoder with 111 candidates that is 111
evaluations of the whole model per search (three searches with ``quantize``'s cross-validated
margin). ``ranking=local`` ranks instead by each op's *local* error: a probe model computes, beside
every candidate, each quantized form on the same float input, and returns per batch the mean over
the output's rows (tokens) of ``|y_form - y|^2 / |y|^2``; one run of the probe over the calibration
batches (about two evaluations' work) gives every op's relative error on every batch. The forms are
the switch models' (:mod:`passes.quantization.forms`), so the probe measures the arithmetic that ships.

What it leaves out is how an op's error propagates to the model's output (an early op's error
passes through more layers; a residual branch's is diluted by the stream it is added to); the
searches measure every subset end to end, so the budget holds either way, and a worse ranking costs
quantized ops, not accuracy. ``ranking=auto`` (both passes' default) takes ``local`` only where
``alone`` would take hours: above :data:`LOCAL_RANKING_BYTES` of candidates x tensor bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import ir

from ._candidates import MS, Candidate
from ._emit import copy_model
from .forms import Form
from ..framework.base import PassError
from ..framework.numerics import tensor_bytes
from ..framework.rewriter import Rewriter
from .sensitivity import Evaluator, release_memory

__all__ = ["LOCAL_RANKING_BYTES", "RANKINGS", "LocalErrors", "build_probe_model", "local_errors", "resolve_ranking"]


#: ``ranking=auto`` ranks by local errors above this many candidates x tensor bytes: ranking by ops
#: alone reads about that many bytes of weights per search. Measured: GPT-2 base (49 ops x 0.5 GB =
#: 24 GB) quantizes to int8 in 8 min with ops alone; on a 1.1 B Llama (111 x 4.4 GB = 490 GB) the same
#: one-op-at-a-time measurement (``quantize-weights{bits=4}``'s) took 2 h 22 min for 104 of the 111.
LOCAL_RANKING_BYTES = 100 << 30
RANKINGS = ("auto", "alone", "local")


def resolve_ranking(pass_name: str, ranking: str, candidates: int, model: ir.Model) -> str:
    """``alone`` or ``local``: ``ranking`` itself, or for ``auto`` by :data:`LOCAL_RANKING_BYTES`."""
    if ranking not in RANKINGS:
        raise PassError(f"{pass_name}: ranking must be {', '.join(RANKINGS[:-1])} or {RANKINGS[-1]}, not {ranking!r}")
    if ranking != "auto":
        return ranking
    return "local" if candidates * tensor_bytes(model) > LOCAL_RANKING_BYTES else "alone"


def build_probe_model(model: ir.Model, candidates: list[Candidate], forms: dict[str, Form],
                      ) -> tuple[ir.Model, dict[tuple[int, str], str]]:
    """A copy of ``model`` that also returns, for every candidate and form, its relative output error.

    The float graph is unchanged (every op reads float inputs); beside each candidate each form of
    ``forms`` (e.g. :func:`~passes.quantization.forms.quantize_forms`) that applies to it reads the
    same input, and a scalar output is added: the mean over the output's rows (every index but the
    last axis: a token) of ``|e|^2 / |r|^2``, ``e`` the form's error ``y_form - y`` as it reaches
    the residual stream and ``r`` the residual sum there (:func:`_residual_path`; ``y`` itself where
    the output joins none). Per row, not over the whole batch: the model normalizes each token
    (LayerNorm, RMSNorm), so a small token's error counts as much as a large one's; measured on
    MiniLM, the whole-batch ratio on the ops' own outputs ranked them against their end-to-end
    errors (Spearman -0.33), as one token's huge activations (where the error is relatively small)
    dominate its sums; per row 0.09; to the residual 0.85.

    Returns:
        The copy, and for each ``(candidate index, form)`` the name of its error output.
    """
    m = copy_model(model)
    graph = m.graph
    rw = Rewriter()
    rw.import_opset(m, MS)
    nodes = list(graph)
    f32 = ir.DataType.FLOAT
    axes_input = (m.opset("") or 0) >= 18  # ReduceSumSquare / ReduceMean take axes as an input from opset 18

    last_axis = rw.constant(graph, np.array([-1], np.int64), name="probe_axes") if axes_input else None

    def row_sum_sq(v: ir.Value) -> ir.Value:
        if last_axis is not None:
            node = rw.make("ReduceSumSquare", [v, last_axis], {"keepdims": 0}, graph=graph,
                           types=[ir.TensorType(f32, None)])
        else:
            node = rw.make("ReduceSumSquare", [v], {"keepdims": 0, "axes": [-1]}, graph=graph,
                           types=[ir.TensorType(f32, None)])
        assert node.outputs[0] is not None
        return node.outputs[0]

    tiny = rw.constant(graph, np.array(1e-30, np.float32), name="probe_tiny")
    outputs: dict[tuple[int, str], str] = {}
    for c in candidates:
        node = nodes[c.index]
        y = node.outputs[0]
        assert y is not None and node.inputs[0] is not None
        residual, weights = _residual_path(graph, rw, y)
        den = rw.make("Max", [row_sum_sq(residual or y), tiny], graph=graph).outputs[0]
        for form, f in forms.items():
            if not f.applies(c):
                continue
            out = f.write(graph, rw, c, node, f"probe{c.index}_{form}")
            diff = rw.make("Sub", [out, y], graph=graph, types=[y.type]).outputs[0]
            for w in weights:  # the error as it reaches the residual stream
                diff = rw.make("MatMul", [diff, w], graph=graph, types=[y.type]).outputs[0]
            assert diff is not None and den is not None
            rel = rw.make("Div", [row_sum_sq(diff), den], graph=graph).outputs[0]
            name = graph.unique_name(f"probe{c.index}_{form}_err")
            err = rw.make("ReduceMean", [rel], {"keepdims": 0}, graph=graph, name=name, output_names=[name],
                          types=[ir.TensorType(f32, ())]).outputs[0]
            assert err is not None
            graph.outputs.append(err)
            outputs[(c.index, form)] = err.name
    graph.sort()
    return m, outputs


#: Ops that add their first two inputs (and normalize the sum): a residual merge.
_SKIP_NORMS = {(MS, "SkipLayerNormalization"), (MS, "SkipSimplifiedLayerNormalization")}


def _residual_path(graph: ir.Graph, rw: Rewriter, y: ir.Value) -> tuple[ir.Value | None, list[ir.Value]]:
    """Where an error in ``y`` joins the residual stream, when ``y``'s only path goes there: the
    residual sum (an ``Add`` / ``Sum`` output, or a skip-normalization's two inputs added, written into
    ``graph``; ``None`` when there is none), and the constant weights of the ``MatMul`` s on the way
    (an error ``e`` arrives as ``e @ W1 @ W2 ...``; constant bias ``Add`` s pass it unchanged).

    The next normalization scales that error by the sum's norm, not by ``y``'s: measured on MiniLM,
    attention output projections have 10-40x the relative error of their FFN neighbours on their own
    outputs and 1/10 of their end-to-end one. Rank correlation (Spearman) of MiniLM's 24 local
    errors with their end-to-end errors alone: 0.09 on the ops' own outputs, 0.41 against the
    residual sums, 0.85 with the projections on the way too (the fused Attention's error through its
    output projection).
    """
    v, weights = y, []
    while len(v.uses()) == 1 and not v.is_graph_output():
        user, idx = v.uses()[0]
        if (user.domain, user.op_type) in _SKIP_NORMS and idx in (0, 1):
            a, b = user.inputs[0], user.inputs[1]
            assert a is not None and b is not None
            return rw.make("Add", [a, b], graph=graph, types=[a.type]).outputs[0], weights
        out = user.outputs[0]
        if user.domain != "" or out is None:
            break
        if user.op_type == "MatMul" and idx == 0 and _constant(user.inputs[1]):
            weights.append(user.inputs[1])
            v = out
            continue
        if user.op_type not in ("Add", "Sum"):
            break
        others = [u for j, u in enumerate(user.inputs) if j != idx]
        if not all(_constant(u) for u in others):
            return out, weights  # the residual Add (or Sum with a bias)
        v = out  # a bias Add: the error passes through unchanged
    return None, []


def _constant(v: ir.Value | None) -> bool:
    return v is not None and (v.is_initializer() or v.const_value is not None)


@dataclass(frozen=True)
class LocalErrors:
    """Relative output errors of every candidate form, per calibration batch.

    Attributes:
        keys: the ``(candidate index, form)`` of each column.
        err: ``[batches, len(keys)]``: the mean over the batch's rows of ``|y_form - y|^2 / |y|^2``.
    """

    keys: tuple[tuple[int, str], ...]
    err: np.ndarray

    def relative(self, batches: list[int], form: str) -> dict[int, float]:
        """Each candidate's relative squared error in ``form``: the worst over ``batches``."""
        worst = self.err[batches].max(axis=0)
        return {i: float(worst[j]) for j, (i, f) in enumerate(self.keys) if f == form}


def local_errors(ev: Evaluator, build: Callable[[], tuple[ir.Model, dict[tuple[int, str], str]]], *,
                 prepack: bool = True, bar: Any = None) -> LocalErrors:
    """Run the probe model ``build()`` gives (:func:`build_probe_model`'s result; built here, so that
    it is dropped once saved for onnxruntime; ``prepack`` as :func:`passes.framework.numerics.session`
    takes it) over ``ev``'s batches (``bar``: a progress bar to advance a batch at a time)."""
    release_memory()
    probe, outputs = build()
    with ev.saved(probe) as source:
        del probe
        sess = ev.session(source, prepack=prepack)
    keys = tuple(outputs)
    names = [outputs[k] for k in keys]
    err = []
    try:
        for feeds in ev.batches:
            err.append([float(v) for v in sess.run(names, feeds)])
            if bar is not None:
                bar.update()
    finally:
        del sess
        release_memory()
    return LocalErrors(keys, np.asarray(err, np.float64))
