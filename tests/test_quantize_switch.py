"""The quantize pass's switch model: ``If`` nodes choose each candidate's form at run time.

Property: for any assignment of forms (float / int8 / 8-bit MatMulNBits) the switch model, fed the
assignment's flags, computes what :func:`apply_plan`'s rewrite of that assignment computes, and with
every flag off exactly the float model.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import ir
from conftest import ort_session
from passes.framework.numerics import model_bytes_or_path
from passes.quantization._emit import Plan, apply_plan
from passes.quantization.forms import build_switch_model, flag_feeds, quantize_forms
from passes.quantization.quantize import FALLBACK_BITS, find_candidates, nbits_writer

B, S, H = 2, 6, 16


def _model() -> onnx.ModelProto:
    """Attention (also a model output) -> MatMul + bias Add -> Relu -> two MatMuls reading one activation -> sum."""
    rng = np.random.default_rng(7)

    def w(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)

    nodes = [
        helper.make_node("Attention", ["x", "wqkv", "bqkv", "mask"], ["att"], domain="com.microsoft", num_heads=2,
                         name="attention"),
        helper.make_node("MatMul", ["att", "w1"], ["h"], name="up"),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["a"], name="down_a"),
        helper.make_node("MatMul", ["r", "w3"], ["b"], name="down_b"),
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Add", ["ab", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "switch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, H]),
         helper.make_tensor_value_info("mask", TensorProto.INT32, [B, S])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, H]),
         helper.make_tensor_value_info("att", TensorProto.FLOAT, [B, S, H])],
        [w("wqkv", H, 3 * H), w("bqkv", 3 * H, scale=0.1), w("w1", H, 2 * H), w("b1", 2 * H, scale=0.1),
         w("w2", 2 * H, H), w("w3", 2 * H, H)],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((B, S, H)).astype(np.float32)
    x[..., 3] *= 20.0  # an outlier channel for the plans that handle one
    mask = np.ones((B, S), np.int32)
    mask[1, 4:] = 0
    return {"x": x, "mask": mask}


def _plans(model: ir.Model) -> dict[str, tuple[list, Plan]]:
    cands = find_candidates(model, ("MatMul", "Attention"))
    matmuls = [c for c in cands if c.op == "MatMul"]
    r = next(c.activation for c in matmuls if c.activation == "r")
    base = Plan(frozenset(), True, False, True, "integer-ops")
    return {
        "integer-ops": (cands, base),
        "smooth+outliers": (cands, Plan(frozenset(), True, False, True, "integer-ops",
                                        smooth={r: np.linspace(0.5, 2.0, 2 * H).astype(np.float32)},
                                        outliers={"att": np.array([3])})),
        "qdq": (matmuls, Plan(frozenset(), False, True, False, "qdq")),
    }


@functools.cache
def _setup() -> tuple[bytes, dict[str, np.ndarray], list[np.ndarray], dict[str, tuple]]:
    proto = _model().SerializeToString()
    model = _load(proto)
    feeds = _feeds()
    ref = ort_session(proto).run(None, feeds)
    switches = {}
    for name, (cands, plan) in _plans(model).items():
        for bits in FALLBACK_BITS:
            switch, flags = build_switch_model(model, cands, quantize_forms(plan, nbits_writer(bits)))
            assert sum(n.op_type == "If" for n in switch.graph) == len(cands)
            switches[name, bits] = (cands, plan, ort_session(model_bytes_or_path(switch)[0]), flags)
    return proto, feeds, ref, switches


def _load(proto: bytes) -> ir.Model:
    return ir.from_onnx(onnx.load_from_string(proto))


@st.composite
def _assignment(draw: st.DrawFn) -> tuple[str, int, dict[int, str]]:
    plan = draw(st.sampled_from(["integer-ops", "smooth+outliers", "qdq"]))
    bits = draw(st.sampled_from(FALLBACK_BITS))
    cands = _setup()[3][plan, bits][0]
    forms = {}
    for c in cands:
        form = draw(st.sampled_from(["float", "int8"] if c.op == "Attention" else ["float", "int8", "nbits"]))
        if form != "float":
            forms[c.index] = form
    return plan, bits, forms


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_assignment())
def test_the_switch_model_computes_what_apply_plan_writes(case: tuple[str, int, dict[int, str]]) -> None:
    plan_name, bits, forms = case
    proto, feeds, ref, switches = _setup()
    cands, plan, sess, flags = switches[plan_name, bits]
    got = sess.run(None, {**feeds, **flag_feeds(flags, forms)})
    if not forms:
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(g, r)  # every flag off: the float model exactly
        return
    chosen = frozenset(i for i, f in forms.items() if f == "int8")
    nbits = frozenset(i for i, f in forms.items() if f == "nbits")
    model = _load(proto)
    apply_plan(model, cands, dataclasses.replace(plan, chosen=chosen, nbits=nbits), nbits_writer(bits))
    want = ort_session(model_bytes_or_path(model)[0]).run(None, feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_the_switch_flags_are_bool_scalars_and_one_if_per_form() -> None:
    proto, _, _, _ = _setup()
    model = _load(proto)
    cands, plan = _plans(model)["integer-ops"]
    switch, flags = build_switch_model(model, cands, quantize_forms(plan, nbits_writer(8)))
    ir.verify(switch)
    inputs = {v.name: v for v in switch.graph.inputs}
    assert all(inputs[n].type == ir.TensorType(ir.DataType.BOOL, ()) for n in flags.values())
    assert set(flags) == {(c.index, f) for c in cands for f in (["int8"] if c.op == "Attention" else ["int8", "nbits"])}
    ifs = [n for n in switch.graph.all_nodes() if n.op_type == "If"]
    assert len(ifs) == len(flags)  # a nested If for the third form
    # the float ops moved into the else-branches, with the weights only they read
    assert not any(n.op_type in ("MatMul", "Attention") for n in switch.graph)
    assert {"w1", "w2", "w3", "wqkv"}.isdisjoint(switch.graph.initializers)
    feeds = flag_feeds(flags, {cands[0].index: "int8"})
    assert feeds[flags[(cands[0].index, "int8")]].dtype == np.bool_ and sum(bool(v) for v in feeds.values()) == 1


@pytest.mark.parametrize("local", [False, True])
def test_the_switch_model_saves_and_runs_from_a_file_sharing_the_weights(tmp_path, local: bool) -> None:
    """Through a file referencing the original's data file (a big model's session): the branches'
    weights are copied, not linked (ONNX's checker refuses hard-linked data in a subgraph)."""
    proto, feeds, ref, _ = _setup()
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    ir.save(_load(proto), str(src), external_data=True, size_threshold=0)
    model = ir.load(str(src))
    cands, plan = _plans(model)["integer-ops"]
    switch, flags = build_switch_model(model, cands, quantize_forms(plan), local_weights=local)
    out = tmp_path / "dst" / "m.onnx"
    out.parent.mkdir()
    ir.save(switch, str(out), external_data=True, share_external_data=True, size_threshold=0)
    got = ort_session(str(out)).run(None, {**feeds, **flag_feeds(flags, {})})
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
