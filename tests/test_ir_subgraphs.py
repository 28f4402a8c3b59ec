"""Subgraphs (If, Loop, Scan) that read outer-scope values survive lower → emit.

Models are built with ``onnx.helper``; each is checked for numerics in onnxruntime (bit-identical
outputs before and after the round trip), for use lists that include the inner nodes reading an
outer value, and for the verifier passing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import ir

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from conftest import ort_run  # noqa: E402

F = TensorProto.FLOAT
I64 = TensorProto.INT64
B = TensorProto.BOOL


def _model(graph: Any, opset: int = 17) -> Any:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _round_trip(proto: Any) -> tuple[ir.Model, Any]:
    m = ir.from_onnx(proto)
    ir.verify(m)
    out = ir.to_onnx(m)
    onnx.checker.check_model(out, full_check=True)
    return m, out


def _same_outputs(a: Any, b: Any, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    ra, rb = ort_run(a.SerializeToString(), feeds), ort_run(b.SerializeToString(), feeds)
    assert list(ra) == list(rb)
    for k in ra:
        assert np.asarray(ra[k]).dtype == np.asarray(rb[k]).dtype
        assert np.array_equal(ra[k], rb[k]), f"output {k} differs"
    return ra


def _branch(node: Any, name: str) -> Any:
    """The GraphProto held by attribute ``name`` of a NodeProto."""
    return next(a.g for a in node.attribute if a.name == name)


def _inner_readers(value: ir.Value) -> list[str]:
    return sorted(n.name for n in value.consumers() if n.graph is not value.graph)


# ------------------------------------------------------------------------------------------------ #
# Builders
# ------------------------------------------------------------------------------------------------ #


def if_model() -> Any:
    """``y = If(cond) then x*scale+t else x-t`` where ``t = Relu(x)`` is computed in the outer graph."""
    then_g = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "scale"], ["then_mul"], name="then_mul"),
            helper.make_node("Add", ["then_mul", "t"], ["then_out"], name="then_add"),
        ],
        "then_branch", [], [helper.make_tensor_value_info("then_out", F, [2, 3])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Sub", ["x", "t"], ["else_out"], name="else_sub")],
        "else_branch", [], [helper.make_tensor_value_info("else_out", F, [2, 3])],
    )
    g = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["t"], name="relu"),
            helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
        ],
        "main",
        [helper.make_tensor_value_info("x", F, [2, 3]), helper.make_tensor_value_info("cond", B, [])],
        [helper.make_tensor_value_info("y", F, [2, 3])],
        [numpy_helper.from_array(np.full((2, 3), 1.5, np.float32), "scale")],
    )
    return _model(g)


def loop_model() -> Any:
    """A Loop whose body adds the outer initializer ``bias`` and the outer value ``shift`` each step."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "bias"], ["acc_a"], name="body_add_bias"),
            helper.make_node("Add", ["acc_a", "shift"], ["acc_out"], name="body_add_shift"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
            helper.make_node("Mul", ["acc_out", "shift"], ["scan_out"], name="body_scan"),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", I64, []),
            helper.make_tensor_value_info("cond_in", B, []),
            helper.make_tensor_value_info("acc_in", F, [3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", B, []),
            helper.make_tensor_value_info("acc_out", F, [3]),
            helper.make_tensor_value_info("scan_out", F, [3]),
        ],
    )
    g = helper.make_graph(
        [
            helper.make_node("Neg", ["x"], ["shift"], name="neg"),
            helper.make_node("Loop", ["n", "", "x"], ["acc", "scans"], name="loop", body=body),
        ],
        "main",
        [helper.make_tensor_value_info("x", F, [3]), helper.make_tensor_value_info("n", I64, [])],
        [helper.make_tensor_value_info("acc", F, [3]), helper.make_tensor_value_info("scans", F, [None, 3])],
        [numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32), "bias")],
    )
    return _model(g)


def scan_model() -> Any:
    """A Scan (cumulative sum) whose body also multiplies by the outer value ``w``."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["sum_in", "elem"], ["sum_out"], name="scan_add"),
            helper.make_node("Mul", ["sum_out", "w"], ["scaled"], name="scan_mul"),
        ],
        "scan_body",
        [helper.make_tensor_value_info("sum_in", F, [2]), helper.make_tensor_value_info("elem", F, [2])],
        [helper.make_tensor_value_info("sum_out", F, [2]), helper.make_tensor_value_info("scaled", F, [2])],
    )
    g = helper.make_graph(
        [
            helper.make_node("Sigmoid", ["init"], ["w"], name="sigmoid"),
            helper.make_node("Scan", ["init", "seq"], ["final", "all"], name="scan", body=body, num_scan_inputs=1),
        ],
        "main",
        [helper.make_tensor_value_info("init", F, [2]), helper.make_tensor_value_info("seq", F, [4, 2])],
        [helper.make_tensor_value_info("final", F, [2]), helper.make_tensor_value_info("all", F, [4, 2])],
    )
    return _model(g)


def nested_model() -> Any:
    """A Loop whose body holds an If whose branches read values from the body and from the main graph."""
    then_g = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "outer"], ["t_out"], name="then_add_outer")],
        "then", [], [helper.make_tensor_value_info("t_out", F, [2])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["doubled", "outer"], ["e_out"], name="else_mul_outer")],
        "else", [], [helper.make_tensor_value_info("e_out", F, [2])],
    )
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "acc_in"], ["doubled"], name="body_double"),
            helper.make_node("Cast", ["iter"], ["iter_f"], name="body_cast", to=F),
            helper.make_node("Less", ["iter_f", "half"], ["small"], name="body_less"),
            helper.make_node("If", ["small"], ["acc_out"], name="body_if", then_branch=then_g, else_branch=else_g),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", I64, []),
            helper.make_tensor_value_info("cond_in", B, []),
            helper.make_tensor_value_info("acc_in", F, [2]),
        ],
        [helper.make_tensor_value_info("cond_out", B, []), helper.make_tensor_value_info("acc_out", F, [2])],
    )
    g = helper.make_graph(
        [
            helper.make_node("Tanh", ["x"], ["outer"], name="tanh"),
            helper.make_node("Loop", ["n", "", "x"], ["res"], name="loop", body=body),
        ],
        "main",
        [helper.make_tensor_value_info("x", F, [2]), helper.make_tensor_value_info("n", I64, [])],
        [helper.make_tensor_value_info("res", F, [2])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "half")],
    )
    return _model(g)


# ------------------------------------------------------------------------------------------------ #
# Tests
# ------------------------------------------------------------------------------------------------ #


@pytest.mark.parametrize("cond", [True, False])
def test_if_reads_outer_values(cond: bool) -> None:
    """Both If branches read outer inputs, initializers and node outputs; numerics are preserved."""
    proto = if_model()
    m, out = _round_trip(proto)
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    got = _same_outputs(proto, out, {"x": x, "cond": np.array(cond)})
    t = np.maximum(x, 0)
    np.testing.assert_allclose(got["y"], x * 1.5 + t if cond else x - t)

    g = m.graph
    x_v = g.inputs[0]
    t_v = next(n for n in g if n.name == "relu").outputs[0]
    assert _inner_readers(x_v) == ["else_sub", "then_mul"]
    assert _inner_readers(t_v) == ["else_sub", "then_add"]
    assert _inner_readers(g.initializers["scale"]) == ["then_mul"]
    if_node = next(n for n in g if n.op_type == "If")
    then_g = if_node.attributes["then_branch"].value
    assert then_g.parent is if_node
    assert {v.name for v in then_g.captured_values()} == {"x", "scale", "t"}


def test_loop_reads_outer_values() -> None:
    """A Loop body reads an outer initializer and an outer node output; use lists include the body."""
    proto = loop_model()
    m, out = _round_trip(proto)
    x = np.array([1, -2, 3], np.float32)
    got = _same_outputs(proto, out, {"x": x, "n": np.array(3, np.int64)})
    acc = x.copy()
    for _ in range(3):
        acc = acc + np.array([1, 2, 3], np.float32) - x
    np.testing.assert_allclose(got["acc"], acc)
    assert got["scans"].shape == (3, 3)
    shift = next(n for n in m.graph if n.name == "neg").outputs[0]
    assert _inner_readers(shift) == ["body_add_shift", "body_scan"]
    assert _inner_readers(m.graph.initializers["bias"]) == ["body_add_bias"]


def test_scan_reads_outer_values() -> None:
    """A Scan body reads an outer node output."""
    proto = scan_model()
    m, out = _round_trip(proto)
    feeds = {"init": np.array([0.5, -1], np.float32), "seq": np.arange(8, dtype=np.float32).reshape(4, 2)}
    got = _same_outputs(proto, out, feeds)
    np.testing.assert_allclose(got["final"], feeds["init"] + feeds["seq"].sum(0), rtol=1e-6)
    w = next(n for n in m.graph if n.name == "sigmoid").outputs[0]
    assert _inner_readers(w) == ["scan_mul"]


def test_nested_subgraphs() -> None:
    """An If inside a Loop body reads values two scopes out and one scope out."""
    proto = nested_model()
    m, out = _round_trip(proto)
    x = np.array([0.25, -0.5], np.float32)
    got = _same_outputs(proto, out, {"x": x, "n": np.array(4, np.int64)})
    outer = np.tanh(x)
    acc = x.copy()
    for i in range(4):
        acc = acc + outer if i < 2 else (acc + acc) * outer
    np.testing.assert_allclose(got["res"], acc, rtol=1e-6)

    outer_v = next(n for n in m.graph if n.name == "tanh").outputs[0]
    assert _inner_readers(outer_v) == ["else_mul_outer", "then_add_outer"]
    loop = next(n for n in m.graph if n.op_type == "Loop")
    body = loop.attributes["body"].value
    doubled = next(n for n in body if n.name == "body_double").outputs[0]
    assert _inner_readers(doubled) == ["else_mul_outer"]
    acc_in = body.inputs[2]
    assert sorted(n.name for n in acc_in.consumers()) == ["body_double", "then_add_outer"]
    inner_if = next(n for n in body if n.op_type == "If")
    assert inner_if.attributes["then_branch"].value.parent is inner_if
    assert inner_if.attributes["then_branch"].value.root() is m.graph
    # Captures of the body include what its nested If reads from the main graph.
    assert {v.name for v in body.captured_values()} == {"outer", "half"}
    assert ir.print_model(ir.from_onnx(out)) == ir.print_model(m)


def test_rewiring_an_outer_value_reaches_inner_nodes() -> None:
    """``replace_all_uses_with`` on an outer value rewires the readers inside subgraphs too."""
    proto = if_model()
    m = ir.from_onnx(proto)
    g = m.graph
    relu = next(n for n in g if n.name == "relu")
    t_v = relu.outputs[0]
    t_v.replace_all_uses_with(g.inputs[0])  # t := x
    assert not t_v.has_uses()
    g.erase(relu)
    ir.verify(m)
    out = ir.to_onnx(m)
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    got = ort_run(out.SerializeToString(), {"x": x, "cond": np.array(True)})
    np.testing.assert_allclose(got["y"], x * 1.5 + x)
    assert "relu" not in {n.name for n in out.graph.node}


def test_outer_value_defined_after_its_reader_is_sorted() -> None:
    """A proto listing the producer of a captured value after the If is re-ordered on lowering."""
    proto = if_model()
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(nodes))  # If first, then the Relu it captures
    m = ir.from_onnx(proto)
    ir.verify(m)
    assert [n.op_type for n in m.graph] == ["Relu", "If"]
    out = ir.to_onnx(m)
    got = ort_run(out.SerializeToString(), {"x": np.ones((2, 3), np.float32), "cond": np.array(False)})
    np.testing.assert_allclose(got["y"], np.zeros((2, 3), np.float32))


def test_subgraph_reading_undefined_outer_value_is_an_error() -> None:
    """An inner node reading a name no enclosing scope defines is reported with the node."""
    proto = if_model()
    then_g = _branch(proto.graph.node[1], "then_branch")
    then_g.node[0].input[1] = "nowhere"
    with pytest.raises(ir.UndefinedValueError, match="then_mul.*nowhere|nowhere.*then_mul"):
        ir.from_onnx(proto)


def test_value_info_and_output_metadata_round_trip() -> None:
    """doc strings and metadata_props of graph outputs and value_info entries are kept (also in subgraphs)."""
    proto = if_model()
    out_vi = proto.graph.output[0]
    out_vi.doc_string = "the result"
    helper.set_metadata_props(out_vi, {"kind": "USER_OUTPUT"})
    vi = helper.make_tensor_value_info("t", F, [2, 3], doc_string="relu of x")
    helper.set_metadata_props(vi, {"origin": "relu"})
    proto.graph.value_info.append(vi)
    then_g = _branch(proto.graph.node[1], "then_branch")
    inner_vi = helper.make_tensor_value_info("then_mul", F, [2, 3])
    helper.set_metadata_props(inner_vi, {"inner": "yes"})
    then_g.value_info.append(inner_vi)
    helper.set_metadata_props(then_g.output[0], {"branch": "then"})

    _, out = _round_trip(proto)
    assert out.graph.output[0].doc_string == "the result"
    assert {p.key: p.value for p in out.graph.output[0].metadata_props} == {"kind": "USER_OUTPUT"}
    (t_vi,) = [v for v in out.graph.value_info if v.name == "t"]
    assert t_vi.doc_string == "relu of x"
    assert {p.key: p.value for p in t_vi.metadata_props} == {"origin": "relu"}
    out_then = _branch(out.graph.node[1], "then_branch")
    (m_vi,) = [v for v in out_then.value_info if v.name == "then_mul"]
    assert {p.key: p.value for p in m_vi.metadata_props} == {"inner": "yes"}
    assert {p.key: p.value for p in out_then.output[0].metadata_props} == {"branch": "then"}
