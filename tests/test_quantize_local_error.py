"""``ranking=local``: the probe model's per-op errors are the errors of the forms the switch model selects.

Property: for any plan (integer-ops, SmoothQuant + outlier channels, qdq; with or without the 8-bit
weight-only form) and any input, the probe's error for every candidate and form is that of what the
switch model with that one op in that form computes at the op's output, against the float model's
output there: the mean over the output's rows of ``|y_form - y|^2 / |r|^2``, ``r`` the residual sum
the output is added to (``y`` itself where there is none).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ir
from conftest import ort_session
from passes.framework.numerics import model_bytes_or_path
from passes.quantization._emit import copy_model
from passes.quantization.forms import build_switch_model, flag_feeds, quantize_forms
from passes.quantization.local_error import build_probe_model, local_errors
from passes.quantization.quantize import nbits_writer
from test_quantize_switch import B, H, S, _model, _plans


def _run(model: ir.Model, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    return ort_session(model_bytes_or_path(model)[0]).run(outputs, feeds)


def _with_outputs(model: ir.Model, names: list[str]) -> ir.Model:
    m = copy_model(model)
    values = {o.name: o for n in m.graph for o in n.outputs if o is not None}
    present = {v.name for v in m.graph.outputs}
    m.graph.outputs.extend(values[n] for n in names if n not in present)
    return m


def _if_output(switch: ir.Model, index: int) -> str:
    """A candidate's output in the switch model: its (outer) If's output, whatever form it selects."""
    return next(n for n in switch.graph if n.name == f"switch{index}_int8").outputs[0].name


class _Batches:
    """The minimal evaluator :func:`local_errors` uses: its batches, a model's bytes, a session on them."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches = batches
        self.prepack: list[bool] = []

    @contextlib.contextmanager
    def saved(self, model: ir.Model) -> Iterator[bytes]:
        yield model_bytes_or_path(model)[0]

    def session(self, source: bytes, *, prepack: bool = True) -> object:
        self.prepack.append(prepack)
        return ort_session(source)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_name=st.sampled_from(["integer-ops", "smooth+outliers", "qdq"]), nbits=st.booleans(),
       seed=st.integers(0, 2**16))
def test_probe_errors_are_the_switch_models_op_errors(plan_name: str, nbits: bool, seed: int) -> None:
    model = ir.from_onnx(_model())
    cands, plan = _plans(model)[plan_name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, S, H)).astype(np.float32)
    x[..., 3] *= rng.uniform(1.0, 30.0)
    mask = np.ones((B, S), np.int32)
    mask[1, rng.integers(1, S):] = 0
    feeds = {"x": x, "mask": mask}
    weight_only = nbits_writer(8) if nbits else None

    probe, outputs = build_probe_model(model, cands, quantize_forms(plan, weight_only))
    ev = _Batches([feeds, feeds])
    got = local_errors(ev, lambda: (probe, outputs), prepack=nbits)
    assert ev.prepack == [nbits]
    assert set(got.keys) == {(c.index, "int8") for c in cands} | {
        (c.index, "nbits") for c in cands if nbits and c.op != "Attention"}
    assert got.err.shape == (2, len(got.keys))
    np.testing.assert_array_equal(got.err[0], got.err[1])  # one batch's errors: the same batch twice

    nodes = list(model.graph)
    y_names = [nodes[c.index].outputs[0].name for c in cands]
    # the residual sum each output joins (read off _model: "att" is a graph output, "h" goes to a Relu)
    residual = {"att": "att", "h": "h", "a": "ab", "b": "ab"}
    y_float = dict(zip(y_names + ["ab"], _run(_with_outputs(model, y_names + ["ab"]), feeds, y_names + ["ab"])))
    switch, flags = build_switch_model(model, cands, quantize_forms(plan, weight_only))
    selected = {c.index: _if_output(switch, c.index) for c in cands}
    switch = _with_outputs(switch, list(selected.values()))
    sess = ort_session(model_bytes_or_path(switch)[0])
    for j, (index, form) in enumerate(got.keys):
        (y_form,) = sess.run([selected[index]], {**feeds, **flag_feeds(flags, {index: form})})
        y = y_float[y_names[[c.index for c in cands].index(index)]]
        name = y_names[[c.index for c in cands].index(index)]
        y64, r64 = y.astype(np.float64), y_float[residual[name]].astype(np.float64)
        rows = ((y_form - y64) ** 2).sum(-1) / (r64 ** 2).sum(-1)
        want = float(rows.mean())
        assert want > 0, (index, form)  # a quantized form that computes the float numbers tests nothing
        assert abs(got.err[0, j] - want) <= 1e-3 * want, (index, form, got.err[0, j], want)
    rel = got.relative([0, 1], "int8")
    assert set(rel) == {c.index for c in cands}
    assert all(v == got.err[0, got.keys.index((i, "int8"))] for i, v in rel.items())


def test_an_error_through_a_projection_is_measured_where_it_joins_the_residual() -> None:
    """``x -> MatMul(w1) -> MatMul(w2) -> Add(x)``: the first op's error reaches the residual as
    ``e @ w2``, relative to the sum; the second's as itself."""
    from onnx import TensorProto, helper, numpy_helper

    from passes.quantization._emit import Plan
    from passes.quantization.quantize import find_candidates

    rng = np.random.default_rng(3)
    k = 32
    w1, w2 = ((rng.standard_normal((k, k)) * 0.2).astype(np.float32) for _ in range(2))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("MatMul", ["h", "w2"], ["p"], name="mm2"), helper.make_node("Add", ["p", "x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, k])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = ir.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    cands = find_candidates(model, ("MatMul",))
    plan = Plan(frozenset(), True, False, True, "integer-ops")
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    x[..., 0] *= 25.0
    probe, outputs = build_probe_model(model, cands, quantize_forms(plan))
    got = local_errors(_Batches([{"x": x}]), lambda: (probe, outputs)).relative([0], "int8")

    switch, flags = build_switch_model(model, cands, quantize_forms(plan))
    sel = {c.index: _if_output(switch, c.index) for c in cands}
    switch = _with_outputs(switch, list(sel.values()))
    sess = ort_session(model_bytes_or_path(switch)[0])
    h, p, y = (v.astype(np.float64) for v in _run(_with_outputs(model, ["h", "p"]), {"x": x}, ["h", "p", "y"]))
    first, second = sorted(cands, key=lambda c: c.index)
    (h_q,) = sess.run([sel[first.index]], {"x": x, **flag_feeds(flags, {first.index: "int8"})})
    (p_q,) = sess.run([sel[second.index]], {"x": x, **flag_feeds(flags, {second.index: "int8"})})
    rows = (y ** 2).sum(-1)
    want_first = float(((((h_q - h) @ w2.astype(np.float64)) ** 2).sum(-1) / rows).mean())
    want_second = float((((p_q - p) ** 2).sum(-1) / rows).mean())
    assert abs(got[first.index] - want_first) <= 1e-3 * want_first
    assert abs(got[second.index] - want_second) <= 1e-3 * want_second
    own = float((((h_q - h) ** 2).sum(-1) / (h ** 2).sum(-1)).mean())
    assert abs(got[first.index] - own) > 0.1 * own  # not the error on the op's own output


def test_relative_error_is_the_worst_batch() -> None:
    from passes.quantization.local_error import LocalErrors

    e = LocalErrors(((0, "int8"), (1, "int8"), (1, "nbits")), err=np.array([[0.1, 0.4, 0.1], [0.3, 0.05, 0.2]]))
    assert e.relative([0, 1], "int8") == {0: 0.3, 1: 0.4}
    assert e.relative([1], "int8") == {0: 0.3, 1: 0.05}
    assert e.relative([0, 1], "nbits") == {1: 0.2}
