"""Local sensitivity: every candidate's own output error in its quantized forms, from one pass over the batches.

``quantize`` ranks its candidates before its search: which ops to try in int8 first. By default it
measures each op quantized alone, end to end (one model evaluation an op, on the hardest batches):
faithful, but on a 1B decoder with 111 candidates that is 111 evaluations of the whole model per
search, three searches with the cross-validated margin. ``ranking=local`` ranks instead by each op's
*local* error: a probe model computes, beside every candidate, its int8 form (and with ``nbits`` its
8-bit weight-only form) on the same float input, and returns per batch ``sum((y_form - y)^2)`` and
``sum(y^2)``; one run of the probe over the calibration batches (about two evaluations' work) gives
every op's relative error on every batch. The forms are the very ones the switch model selects
(:func:`passes.quantization._emit.int8_form`, the weight-only writer's ``_nbits``), so the probe
measures the arithmetic that ships.

What it leaves out is how an op's error propagates to the model's output (an early op's error
passes through more layers; a residual branch's is diluted by the stream it is added to); the
search after the ranking measures every subset end to end, so the budget holds either way and a
worse ranking costs int8 ops, not accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import ir

from ._candidates import MS, Candidate, weight_of
from ._emit import NBITS_BITS, Plan, copy_model, int8_form
from ..framework.rewriter import Rewriter
from .sensitivity import Evaluator

__all__ = ["LocalErrors", "build_probe_model", "local_errors"]


def build_probe_model(model: ir.Model, candidates: list[Candidate], plan: Plan, *, weight_only: Any = None
                      ) -> tuple[ir.Model, dict[tuple[int, str], tuple[str, str]]]:
    """A copy of ``model`` that also returns, for every candidate and form, its squared output error.

    The float graph is unchanged (every op reads float inputs); beside each candidate its ``int8``
    form (and its ``nbits`` form with ``weight_only``, the MatMulNBits writer, for MatMul/Gemm ones)
    reads the same input, and two scalar outputs are added: ``sum((y_form - y)^2)`` and ``sum(y^2)``
    over the whole batch.

    Returns:
        The copy, and for each ``(candidate index, form)`` the names of its (error, reference) outputs.
    """
    m = copy_model(model)
    graph = m.graph
    rw = Rewriter()
    if plan.format == "integer-ops" or weight_only is not None:
        rw.import_opset(m, MS)
    nodes = list(graph)
    scalar = ir.TensorType(ir.DataType.FLOAT, ())
    outputs: dict[tuple[int, str], tuple[str, str]] = {}

    def sum_sq(v: ir.Value, name: str) -> ir.Value:
        out = rw.make("ReduceSumSquare", [v], {"keepdims": 0}, graph=graph, name=name, output_names=[name],
                      types=[scalar]).outputs[0]
        assert out is not None
        graph.outputs.append(out)
        return out

    for c in candidates:
        node = nodes[c.index]
        x, y = node.inputs[0], node.outputs[0]
        assert x is not None and y is not None
        ref = sum_sq(y, graph.unique_name(f"probe{c.index}_ref"))
        forms = ["int8"] + (["nbits"] if weight_only is not None and c.op != "Attention" else [])
        for form in forms:
            if form == "int8":
                got = int8_form(rw, c, node, plan, graph, base=f"probe{c.index}")
            else:
                w, bias = weight_of(node)  # type: ignore[misc]
                got = weight_only._nbits(graph, rw, x, w, bias, NBITS_BITS, f"probe{c.index}_nbits", y.type,
                                         into=graph).outputs[0]
            diff = rw.make("Sub", [got, y], graph=graph, types=[y.type]).outputs[0]
            assert diff is not None
            err = sum_sq(diff, graph.unique_name(f"probe{c.index}_{form}_err"))
            outputs[(c.index, form)] = (err.name, ref.name)
    graph.sort()
    return m, outputs


@dataclass(frozen=True)
class LocalErrors:
    """Squared output errors of every candidate form, per calibration batch.

    Attributes:
        keys: the ``(candidate index, form)`` of each column.
        err: ``[batches, len(keys)]``: ``sum((y_form - y)^2)`` over each batch.
        ref: ``[batches, len(keys)]``: ``sum(y^2)`` over each batch.
    """

    keys: tuple[tuple[int, str], ...]
    err: np.ndarray
    ref: np.ndarray

    def relative(self, batches: list[int], form: str) -> dict[int, float]:
        """Each candidate's relative squared error in ``form``: the worst over ``batches``."""
        rel = self.err[batches] / np.maximum(self.ref[batches], 1e-30)
        worst = rel.max(axis=0)
        return {i: float(worst[j]) for j, (i, f) in enumerate(self.keys) if f == form}


def local_errors(ev: Evaluator, sess: Any, outputs: dict[tuple[int, str], tuple[str, str]],
                 bar: Any = None) -> LocalErrors:
    """Run a probe session (:func:`build_probe_model`) over ``ev``'s batches (``bar``: a progress bar to
    advance a batch at a time)."""
    keys = tuple(outputs)
    names = sorted({n for pair in outputs.values() for n in pair})
    col = {n: j for j, n in enumerate(names)}
    err, ref = [], []
    for feeds in ev.batches:
        got = sess.run(names, feeds)
        err.append([float(got[col[outputs[k][0]]]) for k in keys])
        ref.append([float(got[col[outputs[k][1]]]) for k in keys])
        if bar is not None:
            bar.update()
    return LocalErrors(keys, np.asarray(err, np.float64), np.asarray(ref, np.float64))
