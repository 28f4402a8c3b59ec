"""ir.interop: networkx and onnx-graphsurgeon bridges."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ir
from ir import interop

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from conftest import ROOT, ort_run  # noqa: E402
from test_ir_subgraphs import if_model, nested_model  # noqa: E402

F = TensorProto.FLOAT


def mlp() -> ir.Model:
    """``y = Relu(x @ w + b)``; ``z = Sigmoid(y)``; a second output reads ``y``."""
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"], name="matmul"),
            helper.make_node("Add", ["xw", "b"], ["xwb"], name="add"),
            helper.make_node("Relu", ["xwb"], ["y"], name="relu"),
            helper.make_node("Sigmoid", ["y"], ["z"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", F, ["batch", 4])],
        [helper.make_tensor_value_info("y", F, ["batch", 3]), helper.make_tensor_value_info("z", F, ["batch", 3])],
        [
            numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "w"),
            numpy_helper.from_array(np.full(3, 0.1, np.float32), "b"),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return ir.from_onnx(m)


# ------------------------------------------------------------------------------------------------ #
# networkx
# ------------------------------------------------------------------------------------------------ #


def test_to_networkx_structure() -> None:
    """Vertices are nodes and values; edges follow inputs and outputs with their positions."""
    nx = pytest.importorskip("networkx")
    model = mlp()
    g = interop.to_networkx(model)
    assert isinstance(g, nx.DiGraph)
    assert g.graph["name"] == "mlp"
    kinds = nx.get_node_attributes(g, "kind")
    assert sum(k == "node" for k in kinds.values()) == 4
    assert sorted(k for k, v in kinds.items() if v == "value") == ["%b", "%w", "%x", "%xw", "%xwb", "%y", "%z"]
    roles = nx.get_node_attributes(g, "role")
    assert roles["%x"] == "input" and roles["%w"] == "initializer" and roles["%y"] == "output"
    assert roles["%xw"] == "intermediate"
    assert g.nodes["%x"]["type"] == "float32[batch,4]"
    add = "1:Add:add"
    assert g.nodes[add]["op_type"] == "Add" and g.nodes[add]["ir"].name == "add"
    assert g.edges["%xw", add]["index"] == 0 and g.edges["%b", add]["index"] == 1
    assert g.edges[add, "%xwb"]["index"] == 0
    assert "3:Sigmoid" in g  # unnamed nodes are keyed by position and op
    assert nx.is_directed_acyclic_graph(g)
    # Data flow: every value reachable from x is downstream of the MatMul.
    assert nx.has_path(g, "%x", "%z") and not nx.has_path(g, "%z", "%x")
    assert nx.shortest_path_length(g, "%x", "%z") == 8  # 4 nodes, 4 values after x
    assert {n for n in nx.topological_sort(g) if kinds[n] == "node"} == {
        "0:MatMul:matmul", "1:Add:add", "2:Relu:relu", "3:Sigmoid"}


def test_to_networkx_matches_use_lists() -> None:
    """The digraph's in/out edges are exactly the IR's inputs and use lists."""
    pytest.importorskip("networkx")
    model = mlp()
    g = interop.to_networkx(model.graph)
    for i, node in enumerate(model.graph):
        key = interop.node_key(node, i)
        assert [p for p, _ in sorted(g.in_edges(key), key=lambda e: g.edges[e]["index"])] == [
            f"%{v.name}" for v in node.inputs if v is not None]
    for v in model.graph.initializers.values():
        assert g.out_degree(f"%{v.name}") == len(v.uses())


def test_to_networkx_subgraphs() -> None:
    """Subgraph nodes are included, and outer values connect to the inner nodes that read them."""
    nx = pytest.importorskip("networkx")
    model = ir.from_onnx(nested_model())
    g = interop.to_networkx(model)
    inner = [k for k, d in g.nodes(data=True) if d["kind"] == "node" and d["parent"] is not None]
    names = {g.nodes[k]["name"] for k in inner}
    assert {"body_double", "body_if", "then_add_outer", "else_mul_outer"} <= names
    readers = {g.nodes[n]["name"] for n in g.successors("%outer")}
    assert readers == {"then_add_outer", "else_mul_outer"}
    then_key = next(k for k in inner if g.nodes[k]["name"] == "then_add_outer")
    assert g.nodes[then_key]["graph"] == "then"
    assert g.nodes[g.nodes[then_key]["parent"]]["op_type"] == "If"
    assert nx.is_directed_acyclic_graph(g)
    flat = interop.to_networkx(model, subgraphs=False)
    assert all(d["parent"] is None for _, d in flat.nodes(data=True) if d["kind"] == "node")
    assert "%outer" in flat and flat.out_degree("%outer") == 0


def test_to_networkx_is_exported_lazily_from_ir() -> None:
    """``ir.to_networkx`` is the interop function, and importing ir does not import networkx."""
    pytest.importorskip("networkx")
    assert ir.to_networkx is interop.to_networkx
    assert "to_networkx" in ir.__all__
    with pytest.raises(AttributeError):
        ir.no_such_thing  # noqa: B018
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import ir
        assert "networkx" not in sys.modules and "onnx_graphsurgeon" not in sys.modules
        import ir.interop
        assert "networkx" not in sys.modules and "onnx_graphsurgeon" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT)], check=True)


def test_missing_networkx_gives_a_clear_error() -> None:
    """Without networkx installed, the error says which package to install."""
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        sys.modules["networkx"] = None  # make the import fail
        import ir
        try:
            ir.to_networkx(ir.Graph())
        except ImportError as e:
            assert "networkx" in str(e) and "interop" in str(e), e
        else:
            raise SystemExit("no ImportError")
        """
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT)], check=True)


# ------------------------------------------------------------------------------------------------ #
# onnx-graphsurgeon
# ------------------------------------------------------------------------------------------------ #


def test_graphsurgeon_round_trip() -> None:
    """IR → graphsurgeon → IR keeps structure, names and numerics."""
    gs = pytest.importorskip("onnx_graphsurgeon")
    model = mlp()
    gg = interop.to_graphsurgeon(model)
    assert isinstance(gg, gs.Graph)
    assert [n.name for n in gg.nodes][:3] == ["matmul", "add", "relu"]
    assert isinstance(gg.tensors()["w"], gs.Constant)
    back = interop.from_graphsurgeon(gg)
    ir.verify(back)
    assert [n.op_type for n in back.graph] == ["MatMul", "Add", "Relu", "Sigmoid"]
    assert set(back.graph.initializers) == {"w", "b"}
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    a = ort_run(ir.to_onnx(model).SerializeToString(), {"x": x})
    b = ort_run(ir.to_onnx(back).SerializeToString(), {"x": x})
    assert list(a) == list(b)
    for k in a:
        assert np.array_equal(a[k], b[k])


def test_graphsurgeon_edit_comes_back() -> None:
    """An edit made with graphsurgeon (swap Relu for Tanh, drop Sigmoid) shows up in the IR."""
    pytest.importorskip("onnx_graphsurgeon")
    gg = interop.to_graphsurgeon(mlp())
    relu = next(n for n in gg.nodes if n.op == "Relu")
    relu.op = "Tanh"
    gg.outputs = [t for t in gg.outputs if t.name == "y"]
    gg.cleanup().toposort()
    back = interop.from_graphsurgeon(gg)
    ir.verify(back)
    assert [n.op_type for n in back.graph] == ["MatMul", "Add", "Tanh"]
    x = np.ones((1, 4), np.float32)
    out = ort_run(ir.to_onnx(back).SerializeToString(), {"x": x})
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_allclose(out["y"], np.tanh(x @ w + 0.1), rtol=1e-6)


def test_graphsurgeon_subgraphs() -> None:
    """Models with If subgraphs reading outer values survive the graphsurgeon round trip."""
    pytest.importorskip("onnx_graphsurgeon")
    proto = if_model()
    back = interop.from_graphsurgeon(interop.to_graphsurgeon(ir.from_onnx(proto)))
    ir.verify(back)
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        a = ort_run(proto.SerializeToString(), feeds)
        b = ort_run(ir.to_onnx(back).SerializeToString(), feeds)
        assert np.array_equal(a["y"], b["y"])
