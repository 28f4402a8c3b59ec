"""Unit tests of the IR API: use lists, the linked node list, sorting, naming, tensors, the verifier."""

from __future__ import annotations

import os
import re

import ml_dtypes
import numpy as np
import pytest

import ir
from ir import DataType, Graph, Model, Node, Tensor, TensorType, Value

F32 = TensorType(DataType.FLOAT, (2, 3))


def _uses_by_brute_force(g: Graph) -> dict[int, list[tuple[Node, int]]]:
    uses: dict[int, list[tuple[Node, int]]] = {}
    for n in g.all_nodes():
        for i, v in enumerate(n.inputs):
            if v is not None:
                uses.setdefault(id(v), []).append((n, i))
    return uses


def _all_values(g: Graph) -> list[Value]:
    vals: dict[int, Value] = {}
    for sub in g.all_graphs():
        for v in [*sub.inputs, *sub.initializers.values(), *sub.outputs]:
            vals[id(v)] = v
        for n in sub:
            for v in [*n.inputs, *n.outputs]:
                if v is not None:
                    vals[id(v)] = v
    return list(vals.values())


def assert_uses_exact(g: Graph) -> None:
    """Every value's use list is exactly the set of (node, index) pairs reading it."""
    expected = _uses_by_brute_force(g)
    for v in _all_values(g):
        got = v.uses()
        assert len(got) == len(set(got)), f"%{v.name} lists a use twice"
        assert sorted(got, key=lambda u: (id(u[0]), u[1])) == sorted(
            expected.get(id(v), []), key=lambda u: (id(u[0]), u[1])
        ), f"use list of %{v.name} is wrong"


def chain() -> tuple[Graph, Value, list[Node]]:
    """x -> Relu(a) -> Neg(b) -> Abs(c) = graph output %y."""
    x = Value("x", F32)
    a = Node("Relu", [x], outputs=["a"])
    b = Node("Neg", [a.outputs[0]], outputs=["b"])
    c = Node("Abs", [b.outputs[0]], outputs=["y"])
    g = Graph([x], [c.outputs[0]], [a, b, c], name="g")
    return g, x, [a, b, c]


# -- use lists ------------------------------------------------------------------------------------
def test_construction_records_uses_in_order() -> None:
    x = Value("x", F32)
    n = Node("Add", [x, x], outputs=["y"])
    g = Graph([x], [n.outputs[0]], [n])
    assert x.uses() == [(n, 0), (n, 1)]
    assert x.consumers() == [n]
    assert n.outputs[0].producer() is n and n.outputs[0].index() == 0
    assert_uses_exact(g)


def test_replace_input_moves_exactly_one_use() -> None:
    g, x, (a, b, c) = chain()
    add = Node("Add", [x, x], outputs=["s"])
    g.insert_after(a, add)
    add.replace_input(1, a.outputs[0])
    assert x.uses() == [(a, 0), (add, 0)]
    assert a.outputs[0].uses() == [(b, 0), (add, 1)]
    add.replace_input(0, None)
    assert add.inputs == (None, a.outputs[0])
    assert x.uses() == [(a, 0)]
    assert_uses_exact(g)


def test_replace_input_negative_index_keeps_uses_exact() -> None:
    g, x, (a, b, c) = chain()
    add = Node("Add", [x, x], outputs=["s"])
    g.insert_after(a, add)
    add.replace_input(-1, a.outputs[0])
    assert add.inputs[1] is a.outputs[0]
    assert a.outputs[0].uses() == [(b, 0), (add, 1)]
    assert_uses_exact(g)
    ir.verify(g)


def test_inputs_tuple_is_immutable() -> None:
    _, x, (a, _, _) = chain()
    with pytest.raises((TypeError, AttributeError)):
        a.inputs[0] = x  # type: ignore[index]
    with pytest.raises(AttributeError):
        a.inputs = (x,)  # type: ignore[misc]


def test_replace_all_uses_with_rewires_every_reader() -> None:
    g, x, (a, b, c) = chain()
    m = Node("Mul", [a.outputs[0], a.outputs[0]], outputs=["m"])
    g.insert_after(b, m)
    a.outputs[0].replace_all_uses_with(x)
    assert not a.outputs[0].has_uses()
    assert x.uses() == [(a, 0), (b, 0), (m, 0), (m, 1)]
    assert_uses_exact(g)
    ir.verify(g)


def test_replace_all_uses_with_leaves_graph_outputs_and_names() -> None:
    g, x, (a, b, c) = chain()
    y = c.outputs[0]
    new = Node("Sigmoid", [b.outputs[0]], outputs=["tmp"])
    g.insert_after(c, new)
    y.replace_all_uses_with(new.outputs[0])
    assert g.outputs == [y] and y.is_graph_output() and not new.outputs[0].is_graph_output()
    assert (y.name, new.outputs[0].name) == ("y", "tmp"), "the IR never renames"
    with pytest.raises(ir.IRError, match="is a graph output"):
        g.erase(c)
    ir.verify(g)


def test_replace_all_uses_with_graph_outputs_on_request_keeps_names() -> None:
    g, x, (a, b, c) = chain()
    new = Node("Sigmoid", [b.outputs[0]], outputs=["tmp"])
    g.insert_after(c, new)
    c.outputs[0].replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    assert g.outputs == [new.outputs[0]] and new.outputs[0].name == "tmp" and c.outputs[0].name == "y"
    assert new.outputs[0].is_graph_output() and not c.outputs[0].is_graph_output()
    g.erase(c)
    ir.verify(g)


def test_replace_all_uses_with_graph_input_does_not_rename_input() -> None:
    g, x, (a, b, c) = chain()
    c.outputs[0].replace_all_uses_with(x, replace_graph_outputs=True)
    assert g.outputs == [x] and x.name == "x" and c.outputs[0].name == "y"


def test_subgraph_reads_are_uses() -> None:
    x = Value("x", F32)
    cond = Value("cond", TensorType(DataType.BOOL, ()))
    then_n = Node("Relu", [x], outputs=["t"])
    then_g = Graph([], [then_n.outputs[0]], [then_n], name="then")
    else_n = Node("Neg", [x], outputs=["e"])
    else_g = Graph([], [else_n.outputs[0]], [else_n], name="else")
    if_n = Node("If", [cond], {"then_branch": then_g, "else_branch": else_g}, outputs=["y"])
    g = Graph([x, cond], [if_n.outputs[0]], [if_n])
    assert set(x.uses()) == {(then_n, 0), (else_n, 0)}
    assert then_g.parent is if_n and then_g.root() is g
    assert [v.name for v in then_g.captured_values()] == ["x"]
    x2 = g.add_input(Value("x2", F32))
    x.replace_all_uses_with(x2)
    assert set(x2.uses()) == {(then_n, 0), (else_n, 0)} and not x.has_uses()
    ir.verify(g)


# -- the linked node list -------------------------------------------------------------------------
def test_insert_before_and_after_order_and_uses() -> None:
    g, x, (a, b, c) = chain()
    p = Node("Identity", [x], outputs=["p"])
    q = Node("Identity", [x], outputs=["q"])
    g.insert_before(a, [p, q])
    r = Node("Identity", [c.outputs[0]], outputs=["r"])
    g.insert_after(c, r)
    assert [n.outputs[0].name for n in g] == ["p", "q", "a", "b", "y", "r"]
    assert len(g) == 6
    assert x.uses() == [(a, 0), (p, 0), (q, 0)]
    assert_uses_exact(g)


def test_insert_refuses_node_already_in_a_graph_and_foreign_ref() -> None:
    g, x, (a, b, c) = chain()
    with pytest.raises(ir.IRError, match="already in a graph"):
        g.append(a)
    other = Graph()
    with pytest.raises(ir.IRError, match="not in graph"):
        other.insert_before(a, Node("Relu", [x]))


def test_erase_refuses_used_output_and_graph_output() -> None:
    g, x, (a, b, c) = chain()
    with pytest.raises(ir.IRError, match=r"%a is still used by Neg"):
        g.erase(a)
    with pytest.raises(ir.IRError, match=r"%y is a graph output"):
        g.erase(c)
    assert len(g) == 3 and a.graph is g
    assert_uses_exact(g)


def test_erase_group_with_internal_uses() -> None:
    g, x, (a, b, c) = chain()
    dead1 = Node("Relu", [x], outputs=["d1"])
    dead2 = Node("Neg", [dead1.outputs[0]], outputs=["d2"])
    g.insert_after(a, [dead1, dead2])
    with pytest.raises(ir.IRError, match="still used"):
        g.erase(dead1)
    g.erase([dead1, dead2])
    assert [n.op_type for n in g] == ["Relu", "Neg", "Abs"]
    assert x.uses() == [(a, 0)]
    assert dead1.graph is None and len(g) == 3
    assert_uses_exact(g)
    ir.verify(g)


def test_erase_then_reinsert_reattaches_uses() -> None:
    g, x, (a, b, c) = chain()
    d = Node("Relu", [x], outputs=["d"])
    g.append(d)
    g.erase(d)
    assert x.uses() == [(a, 0)]
    g.append(d)
    assert x.uses() == [(a, 0), (d, 0)]
    ir.verify(g)


def test_move_before_keeps_uses() -> None:
    g, x, (a, b, c) = chain()
    d = Node("Relu", [x], outputs=["d"])
    g.append(d)
    g.move_before(a, d)
    assert [n.outputs[0].name for n in g] == ["d", "a", "b", "y"]
    assert len(g) == 4
    assert x.uses() == [(a, 0), (d, 0)]
    ir.verify(g)


def test_move_before_refuses_node_of_another_graph() -> None:
    g, x, (a, b, c) = chain()
    g2, _, (a2, _, _) = chain()
    with pytest.raises(ir.IRError):
        g.move_before(a, a2)
    assert len(g) == 3 and len(g2) == 3 and a2.graph is g2


def test_iteration_survives_erasing_current_and_next() -> None:
    g, x, (a, b, c) = chain()
    dead = [Node("Relu", [x], outputs=[f"d{i}"]) for i in range(4)]
    g.insert_after(a, dead)
    seen = []
    for n in g:
        seen.append(n.outputs[0].name)
        if n.outputs[0].name == "d0":
            g.erase([n, dead[1]])  # the current node and the next one
    assert seen == ["a", "d0", "d2", "d3", "b", "y"]
    assert [n.outputs[0].name for n in g] == ["a", "d2", "d3", "b", "y"]


def test_iteration_visits_nodes_inserted_after_cursor_but_not_before() -> None:
    g, x, (a, b, c) = chain()
    seen = []
    for n in g:
        seen.append(n.outputs[0].name)
        if n is a:
            g.insert_after(a, Node("Identity", [x], outputs=["after"]))
            g.insert_before(a, Node("Identity", [x], outputs=["before"]))
    assert seen == ["a", "after", "b", "y"]
    assert [n.outputs[0].name for n in reversed(g)] == ["y", "b", "after", "a", "before"]


# -- sorting and naming ---------------------------------------------------------------------------
def test_sort_is_stable_and_topological() -> None:
    x = Value("x", F32)
    a = Node("Relu", [x], outputs=["a"])
    b = Node("Neg", [a.outputs[0]], outputs=["b"])
    i1 = Node("Identity", [x], outputs=["i1"])
    i2 = Node("Identity", [x], outputs=["i2"])
    g = Graph([x], [b.outputs[0]], [i1, b, i2, a])  # b before its producer a
    with pytest.raises(ir.VerificationError, match=r"reads %a before its producer Relu"):
        ir.verify(g)
    g.sort()
    assert [n.outputs[0].name for n in g] == ["i1", "i2", "a", "b"]
    ir.verify(g)
    before = [n.outputs[0].name for n in g]
    g.sort()
    assert [n.outputs[0].name for n in g] == before


def test_sort_cycle_error_names_a_node() -> None:
    x = Value("x", F32)
    a = Node("Add", [x, x], outputs=["a"], name="first")
    b = Node("Neg", [a.outputs[0]], outputs=["b"], name="second")
    a.replace_input(1, b.outputs[0])
    g = Graph([x], [b.outputs[0]], [a, b])
    with pytest.raises(ir.CycleError, match=r"'first'|'second'"):
        g.sort()
    selfloop = Node("Relu", [x], outputs=["s"], name="loop")
    selfloop.replace_input(0, selfloop.outputs[0])
    g2 = Graph([x], [], [selfloop])
    with pytest.raises(ir.CycleError, match="'loop' reads its own output"):
        g2.sort()


def test_unique_name_avoids_every_name_in_the_model() -> None:
    g, x, (a, b, c) = chain()
    assert g.unique_name("fresh") == "fresh"
    assert g.unique_name("fresh") != "fresh"
    for taken in ("x", "a", "b", "y"):
        assert g.unique_name(taken) != taken
    g.append(Node("Relu", [x], outputs=["later"]))
    assert g.unique_name("later") != "later"


def test_unique_name_sees_inputs_and_initializers_added_after_first_use() -> None:
    g, x, (a, b, c) = chain()
    g.unique_name("warm")  # builds the name cache
    g.add_input(Value("late_input", F32))
    g.add_initializer(Value("late_init", const_value=Tensor(np.zeros(3, np.float32))))
    assert g.unique_name("late_input") != "late_input"
    assert g.unique_name("late_init") != "late_init"


def test_unique_name_in_subgraph_uses_root_names() -> None:
    x = Value("x", F32)
    body_n = Node("Relu", [x], outputs=["inner"])
    body = Graph([], [body_n.outputs[0]], [body_n], name="body")
    cond = Value("cond", TensorType(DataType.BOOL, ()))
    if_n = Node("If", [cond], {"then_branch": body, "else_branch": Graph([], [x], name="e")}, outputs=["y"])
    g = Graph([x, cond], [if_n.outputs[0]], [if_n])
    assert body.unique_name("x") != "x"
    assert g.unique_name("inner") != "inner"


def test_constant_helper_adds_initializer() -> None:
    g, x, _ = chain()
    v = g.constant(np.ones((2, 3), np.float32), name="ones")
    assert v.is_initializer() and not v.is_graph_input() and v.producer() is None
    assert v.type == TensorType(DataType.FLOAT, (2, 3))
    v2 = g.constant(np.ones(1, np.float32), name="ones")
    assert v2.name != "ones"


def test_remove_initializer_refuses_while_used() -> None:
    g, x, (a, _, _) = chain()
    w = g.constant(np.ones((2, 3), np.float32), name="w")
    add = Node("Add", [a.outputs[0], w], outputs=["s"])
    g.insert_after(a, add)
    with pytest.raises(ir.IRError, match="still used"):
        g.remove_initializer("w")
    g.erase(add)
    g.remove_initializer("w")
    assert "w" not in g.initializers and not w.is_initializer()


# -- tensors --------------------------------------------------------------------------------------
def test_raw_tensor_is_not_decoded_until_numpy() -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = Tensor.from_raw(arr.tobytes(), DataType.FLOAT, (2, 3), name="t")
    assert not t.is_loaded
    assert bytes(t.raw_bytes()) == arr.tobytes()
    assert t.nbytes == 24 and t.size == 6
    assert not t.is_loaded, "raw_bytes/nbytes must not decode"
    np.testing.assert_array_equal(t.numpy(), arr)
    assert t.is_loaded


def test_lowered_initializers_stay_lazy_through_emit() -> None:
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, 8])], [w],
    )
    m = ir.from_onnx(helper.make_model(graph))
    t = m.graph.initializers["w"].const_value
    assert not t.is_loaded
    ir.print_model(m)  # 64 elements: printed as a digest, never decoded
    proto = ir.to_onnx(m)
    assert not t.is_loaded
    assert proto.graph.initializer[0].raw_data == w.raw_data


def test_from_raw_checks_length() -> None:
    with pytest.raises(ir.IRError, match="5 bytes"):
        Tensor.from_raw(b"\0" * 5, DataType.FLOAT, (2,))


@pytest.mark.parametrize(
    "dtype, values",
    [
        (DataType.INT4, [-8, -1, 0, 3, 7]),
        (DataType.UINT4, [0, 1, 9, 15, 4, 2]),
        (DataType.INT2, [-2, -1, 0, 1, 1]),
        (DataType.UINT2, [0, 3, 2, 1, 3, 3, 0]),
    ],
)
def test_sub_byte_packing_round_trips(dtype: DataType, values: list[int]) -> None:
    arr = np.array(values, dtype=dtype.numpy())
    t = Tensor(arr, dtype=dtype)
    raw = bytes(t.raw_bytes())
    per_byte = 8 // dtype.bitwidth
    assert len(raw) == (len(values) + per_byte - 1) // per_byte
    back = Tensor.from_raw(raw, dtype, (len(values),))
    assert [int(v) for v in back.numpy()] == values


def test_int4_packing_matches_onnx_layout() -> None:
    # ONNX packs the first element in the low nibble: [1, -2] -> 0xE1.
    t = Tensor(np.array([1, -2], dtype=ml_dtypes.int4), dtype=DataType.INT4)
    assert bytes(t.raw_bytes()) == bytes([0xE1])


def test_external_tensor_maps_file_lazily(tmp_path: os.PathLike[str]) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = os.path.join(tmp_path, "w.data")
    with open(path, "wb") as f:
        f.write(b"\xff" * 100)
        f.write(arr.tobytes())
    t = Tensor.from_external(ir.ExternalLocation(path, 100, -1), DataType.FLOAT, (3, 4), name="w")
    assert t.external is not None and t.external.length == 48
    assert not t.is_loaded
    assert bytes(t.raw_bytes()) == arr.tobytes()
    np.testing.assert_array_equal(t.numpy(), arr)
    with pytest.raises(ir.IRError, match="too short"):
        Tensor.from_external(ir.ExternalLocation(path, 120, 48), DataType.FLOAT, (3, 4))
    with pytest.raises(ir.IRError, match="does not exist"):
        Tensor.from_external(ir.ExternalLocation(path + "x", 0, 4), DataType.FLOAT, (1,))


def test_external_tensor_survives_save_and_load(tmp_path: os.PathLike[str]) -> None:
    x = Value("x", TensorType(DataType.FLOAT, (2, 64)))
    g = Graph([x], name="g")
    w = g.constant(np.arange(64 * 4, dtype=np.float32).reshape(64, 4), name="w")
    mm = g.append(Node("MatMul", [x, w], outputs=["y"]))
    g.outputs.append(mm.outputs[0])
    path = os.path.join(tmp_path, "m.onnx")
    ir.save(Model(g), path, external_data=True, size_threshold=16)
    m = ir.load(path)
    t = m.graph.initializers["w"].const_value
    assert t.external is not None and not t.is_loaded
    np.testing.assert_array_equal(t.numpy(), np.arange(256, dtype=np.float32).reshape(64, 4))


# -- the verifier ---------------------------------------------------------------------------------
def test_verify_accepts_well_formed_graph() -> None:
    g, _, _ = chain()
    ir.verify(g)
    ir.verify(Model(g))


def _err(g: Graph | Model) -> str:
    with pytest.raises(ir.VerificationError) as e:
        ir.verify(g)
    return str(e.value)


def test_verify_missing_use() -> None:
    g, x, (a, b, c) = chain()
    del a.outputs[0]._uses[(b, 0)]
    assert re.search(r"Neg -> %b: input 0 \(%a\) does not list the node", _err(g))


def test_verify_use_of_erased_node() -> None:
    g, x, (a, b, c) = chain()
    ghost = Node("Relu", [], outputs=["ghost"], name="ghost")
    ghost._inputs = (a.outputs[0],)
    a.outputs[0]._uses[(ghost, 0)] = None
    assert "%a lists erased node Relu 'ghost'" in _err(g)


def test_verify_stale_use_on_graph_input() -> None:
    g, x, (a, b, c) = chain()
    ghost = Node("Relu", [x], outputs=["ghost"], name="ghost")  # built, never inserted
    assert (ghost, 0) in x._uses
    assert "%x lists erased node Relu 'ghost'" in _err(g)


def test_verify_use_that_reads_another_value() -> None:
    g, x, (a, b, c) = chain()
    a.outputs[0]._uses[(c, 0)] = None
    assert "%a lists use (Abs -> %y, 0) that reads another value" in _err(g)


def test_verify_second_producer() -> None:
    g, x, (a, b, c) = chain()
    b.outputs[0]._producer = a
    assert "Neg -> %b: output 0 (%b) names another producer" in _err(g)


def test_verify_topological_order() -> None:
    g, x, (a, b, c) = chain()
    g.move_before(a, b)
    assert "Neg -> %b reads %a before its producer Relu -> %a" in _err(g)


def test_verify_duplicate_and_empty_names() -> None:
    g, x, (a, b, c) = chain()
    b.outputs[0].name = "a"
    assert "value name %a is used by two different values" in _err(g)
    g, x, (a, b, c) = chain()
    b.outputs[0].name = ""
    assert "output of node Neg" in _err(g)


def test_verify_undefined_graph_output_and_input() -> None:
    g, x, (a, b, c) = chain()
    g.outputs.append(Value("ghost", F32))
    assert "output %ghost is not defined" in _err(g)
    g, x, (a, b, c) = chain()
    stray = Value("stray", F32)
    b.replace_input(0, stray)
    assert "Neg -> %b: input 0 reads %stray, which is not defined" in _err(g)


def test_verify_initializer_invariants() -> None:
    g, x, _ = chain()
    w = g.constant(np.ones(3, np.float32), name="w")
    g.initializers["other"] = g.initializers.pop("w")
    assert "%w is registered under another name 'other'" in _err(g)
    g, x, _ = chain()
    w = g.constant(np.ones(3, np.float32), name="w")
    w.const_value = None
    assert "initializer %w has no data" in _err(g)


def test_verify_quantized_op_needs_scale() -> None:
    x = Value("x", F32)
    q = Node("QuantizeLinear", [x], outputs=["q"], name="quant")
    g = Graph([x], [q.outputs[0]], [q])
    assert "quantized node QuantizeLinear 'quant' has no y_scale" in _err(g)
    q.replace_input(0, x)
    scale = g.constant(np.array(0.1, np.float32), name="s")
    q2 = Node("QuantizeLinear", [x, scale], outputs=["q2"])
    g.append(q2)
    g.outputs[:] = [q2.outputs[0]]
    g.erase(q)
    ir.verify(g)


def test_verify_node_count_and_foreign_node() -> None:
    g, x, (a, b, c) = chain()
    g._len += 1
    assert "counts 4 nodes but holds 3" in _err(g)
    g, x, (a, b, c) = chain()
    b._graph = Graph(name="elsewhere")
    assert "Neg -> %b" in _err(g)


def test_verify_subgraph_parent() -> None:
    x = Value("x", F32)
    body_n = Node("Relu", [x], outputs=["t"])
    body = Graph([], [body_n.outputs[0]], [body_n], name="then")
    cond = Value("cond", TensorType(DataType.BOOL, ()))
    if_n = Node("If", [cond], {"then_branch": body, "else_branch": Graph([], [x], name="else")}, outputs=["y"])
    g = Graph([x, cond], [if_n.outputs[0]], [if_n])
    ir.verify(g)
    body.parent = None
    assert "subgraph 'then' of node If -> %y names another parent" in _err(g)


def test_verify_subgraph_reading_later_outer_value() -> None:
    x = Value("x", F32)
    cond = Value("cond", TensorType(DataType.BOOL, ()))
    late = Node("Relu", [x], outputs=["late"])
    body_n = Node("Neg", [late.outputs[0]], outputs=["t"])
    body = Graph([], [body_n.outputs[0]], [body_n], name="then")
    if_n = Node("If", [cond], {"then_branch": body, "else_branch": Graph([], [x], name="else")}, outputs=["y"])
    g = Graph([x, cond], [if_n.outputs[0]], [if_n, late])
    assert "reads %late" in _err(g)
    g.sort()
    ir.verify(g)
    assert [n.op_type for n in g] == ["Relu", "If"]


# -- identity and structure -----------------------------------------------------------------------
def test_identity_semantics() -> None:
    a, b = Value("x", F32), Value("x", F32)
    assert a != b and a == a and len({a, b}) == 2
    g1, _, _ = chain()
    g2, _, _ = chain()
    assert g1 != g2 and len({g1, g2}) == 2
    n1, n2 = Node("Relu", [a]), Node("Relu", [a])
    assert n1 != n2 and a.uses() == [(n1, 0), (n2, 0)]


def test_structurally_equal() -> None:
    g1, _, _ = chain()
    g2, _, (a2, _, _) = chain()
    assert ir.structurally_equal(g1, g2)
    assert ir.structurally_equal(Model(g1), Model(g2))
    assert not ir.structurally_equal(Model(g1), g2)
    a2.set_attr("alpha", 0.5)
    assert not ir.structurally_equal(g1, g2)
    g3, _, _ = chain()
    g4, _, _ = chain()
    big = np.zeros((8, 8), np.float32)
    g3.constant(big, name="w")
    big2 = big.copy()
    big2[7, 7] = 1.0
    g4.constant(big2, name="w")
    assert not ir.structurally_equal(g3, g4), "tensor data beyond the inline limit must count"


def test_attr_infer_kinds() -> None:
    A = ir.AttrType
    pairs = [
        (1, A.INT), (True, A.INT), (1.5, A.FLOAT), ("s", A.STRING), ([1, 2], A.INTS), ([1, 2.5], A.FLOATS),
        (["a"], A.STRINGS), (Tensor(np.zeros(1)), A.TENSOR), (Graph(), A.GRAPH), ([Graph()], A.GRAPHS),
    ]
    for value, kind in pairs:
        assert ir.Attr.infer("a", value).type == kind, value
    with pytest.raises(ir.IRError, match="cannot infer"):
        ir.Attr.infer("a", object())


def test_erase_refuses_value_returned_directly_by_a_subgraph() -> None:
    f = TensorType(DataType.FLOAT, (2,))
    x, c = Value("x", f), Value("c", TensorType(DataType.BOOL, ()))
    p = Node("Relu", [x], outputs=[Value("r", f)])
    then_g = Graph([], [p.outputs[0]], name="then")
    iff = Node("If", [c], {"then_branch": then_g, "else_branch": Graph([], [x], name="else")}, outputs=["y"])
    g = Graph([x, c], [iff.outputs[0]], [p, iff])
    ir.verify(g)
    with pytest.raises(ir.IRError, match="returned by subgraph 'then'"):
        g.erase(p)
    # Rewiring reaches the subgraph output too, after which the producer can go.
    q = Node("Neg", [x], outputs=[Value("q", f)])
    g.insert_before(p, q)
    p.outputs[0].replace_all_uses_with(q.outputs[0])
    assert then_g.outputs == [q.outputs[0]]
    g.erase(p)
    ir.verify(g)


def test_only_lower_and_emit_import_onnx() -> None:
    import ast
    import pathlib

    root = pathlib.Path(ir.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name in ("lower.py", "emit.py") and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n == "onnx" or n.startswith("onnx.") for n in names):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []
