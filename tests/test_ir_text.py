"""The IR's text form: golden prints, determinism, and the parser's round trip."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import parser

import ir
from ir import (
    Attr, AttrType, DataType, Graph, MapType, Model, Node, OpaqueType, OptionalType, SequenceType,
    SparseTensorType, Tensor, TensorType, Value,
)


def roundtrip(model: Model) -> Model:
    """Print in full, parse, and check the reprint is the same text."""
    text = ir.print_model(model, full_tensors=True)
    again = ir.parse_model(text)
    assert ir.print_model(again, full_tensors=True) == text
    return again


def small_graph() -> Graph:
    x = Value("x", TensorType(DataType.FLOAT, ("batch", 4)))
    g = Graph([x], name="g")
    w = g.constant(np.array([1, 2, 3, 4], np.float32), name="w")
    add = g.append(Node("Add", [x, w], outputs=[Value("y", TensorType(DataType.FLOAT, ("batch", 4)))], name="add0"))
    sm = g.append(Node("Softmax", [add.outputs[0]], {"axis": -1}, outputs=["z"]))
    g.outputs.append(sm.outputs[0])
    return g


# -- golden text ----------------------------------------------------------------------------------
def test_golden_graph() -> None:
    assert ir.print_graph(small_graph()) == (
        'graph "g" (%x: float32[batch,4]) -> (%z: ?) {\n'
        "  init %w: float32[4] = float32[4] [1.0, 2.0, 3.0, 4.0]\n"
        '  %y: float32[batch,4] = Add(%x, %w) name "add0"\n'
        "  %z = Softmax<axis=-1>(%y)\n"
        "}"
    )


def test_golden_model_header_sorts_opsets_and_metadata() -> None:
    m = Model(small_graph(), opset_imports={"com.microsoft": 1, "": 18}, producer_name="t", model_version=3)
    m.metadata_props = {"b": "2", "a": "1"}
    m.doc_string = "two\nlines"
    assert ir.print_model(m).split("graph")[0] == (
        'model ir_version 10 producer "t" "" domain "" version 3\n'
        'doc "two\\nlines"\n'
        'opset "" 18\n'
        'opset "com.microsoft" 1\n'
        'meta "a" "1"\n'
        'meta "b" "2"\n'
    )


def test_golden_large_tensor_prints_digest_unless_full() -> None:
    g = Graph(name="g")
    v = g.constant(np.arange(20, dtype=np.int32), name="big")
    g.outputs.append(v)
    short = ir.print_graph(g)
    assert "init %big: int32[20] = int32[20] sha256:" in short
    full = ir.print_graph(g, full_tensors=True)
    assert "int32[20] [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]" in full


def every_attribute_graph() -> Graph:
    x = Value("x", TensorType(DataType.FLOAT, (2,)))
    g = Graph([x], name="attrs")
    sub = Graph([], [x], name="sub")
    n = Node("Custom", [x, None], [
        Attr("i", AttrType.INT, -3), Attr("f", AttrType.FLOAT, 0.1), Attr("fi", AttrType.FLOAT, 2.0),
        Attr("nan", AttrType.FLOAT, float("nan")), Attr("ninf", AttrType.FLOAT, float("-inf")),
        Attr("s", AttrType.STRING, 'say "hi"\n\u00e9'), Attr("e_ints", AttrType.INTS, []),
        Attr("e_floats", AttrType.FLOATS, []), Attr("e_strings", AttrType.STRINGS, []),
        Attr("ints", AttrType.INTS, [1, -2]), Attr("floats", AttrType.FLOATS, [1.0, 1e-30, float("inf")]),
        Attr("strings", AttrType.STRINGS, ["a", ""]),
        Attr("t", AttrType.TENSOR, Tensor(np.array([True, False]))),
        Attr("ts", AttrType.TENSORS, [
            Tensor(np.array("s", dtype=object), dtype=DataType.STRING), Tensor(np.array([1 + 2j], np.complex64)),
        ]),
        Attr("g", AttrType.GRAPH, sub),
        Attr("tp", AttrType.TYPE_PROTO, SequenceType(TensorType(DataType.INT64, (None, "n")))),
        Attr("tps", AttrType.TYPE_PROTOS, [
            OptionalType(None), MapType(DataType.STRING, TensorType(DataType.FLOAT)), OpaqueType("d", "n"),
            SparseTensorType(DataType.FLOAT, (3,)),
        ]),
        Attr("sp", AttrType.SPARSE_TENSOR, (Tensor(np.array([5.0], np.float32)), Tensor(np.array([1], np.int64)), [3])),
    ], domain="com.example", outputs=["y", None, "z"], overload="v2")
    g.append(n)
    g.outputs.append(n.outputs[0])
    return g


def test_golden_every_attribute_kind() -> None:
    assert ir.print_graph(every_attribute_graph()) == (
        'graph "attrs" (%x: float32[2]) -> (%y: ?) {\n'
        '  %y, _, %z = com.example::Custom:"v2"<i=-3, f=0.1, fi=2.0, nan=nan, ninf=-inf, '
        's="say \\"hi\\"\\n\u00e9", e_ints=ints[], e_floats=floats[], e_strings=strings[], ints=ints[1, -2], '
        'floats=floats[1.0, 1e-30, inf], strings=strings["a", ""], t=tensor bool[2] [true, false], '
        'ts=tensors[string[] ["s"], complex64[1] [(1.0,2.0)]], g=graph "sub" () -> (%x: float32[2]) {\n'
        "  }, tp=type seq<int64[?,n]>, tps=types[optional<?>, map<string,float32>, opaque<\"d\",\"n\">, "
        "sparse<float32[3]>], sp=sparse {float32[1] [5.0]; int64[1] [1]; ints[3]}>(%x, _)\n"
        "}"
    )


def test_every_attribute_kind_round_trips() -> None:
    g = every_attribute_graph()
    text = ir.print_graph(g, full_tensors=True)
    again = ir.parse_graph(text)
    assert ir.print_graph(again, full_tensors=True) == text
    n = next(iter(again))
    kinds = {a.name: a.type for a in n.attributes.values()}
    assert kinds == {a.name: a.type for a in next(iter(g)).attributes.values()}
    assert n.attr("i") == -3 and isinstance(n.attr("i"), int)
    assert n.attr("fi") == 2.0 and isinstance(n.attr("fi"), float)
    assert np.isnan(n.attr("nan"))
    assert n.attr("s") == 'say "hi"\n\u00e9'
    assert n.domain == "com.example" and n.overload == "v2" and n.outputs[1] is None and n.inputs[1] is None
    assert n.attr("ts")[1].numpy()[0] == np.complex64(1 + 2j)
    assert n.attr("g").parent is n


@pytest.mark.parametrize(
    "name, printed",
    [
        ("onnx::MatMul_1", "%onnx::MatMul_1"),
        ("/enc/Add_output_0", '%"/enc/Add_output_0"'),
        ("x:", '%"x:"'),
        ("1abc", '%"1abc"'),
        ("a b", '%"a b"'),
        ("", '%""'),
        ("sha256", "%sha256"),
    ],
)
def test_names_print_bare_or_quoted_and_round_trip(name: str, printed: str) -> None:
    x = Value(name, TensorType(DataType.FLOAT, (1,)))
    n = Node("Relu", [x], outputs=[Value(name + "_out", TensorType(DataType.FLOAT, (1,)))])
    g = Graph([x], [n.outputs[0]], [n], name="g")
    text = ir.print_graph(g)
    assert f"({printed}: float32[1])" in text
    again = ir.parse_graph(text)
    assert [v.name for v in again.inputs] == [name]
    assert ir.print_graph(again) == text


def test_ops_and_domains_with_colons_are_quoted() -> None:
    x = Value("x", TensorType(DataType.FLOAT, (1,)))
    n = Node("My::Op", [x], domain="a:b", outputs=["y"])
    g = Graph([x], [n.outputs[0]], [n], name="g")
    text = ir.print_graph(g)
    assert '"a:b"::"My::Op"(%x)' in text
    again = next(iter(ir.parse_graph(text)))
    assert (again.domain, again.op_type) == ("a:b", "My::Op")


@pytest.mark.parametrize(
    "dtype, values",
    [
        (DataType.FLOAT, [0.1, -0.0, float("nan"), float("inf"), float("-inf"), 3.4028234663852886e38]),
        (DataType.DOUBLE, [0.1, 1e-300]),
        (DataType.FLOAT16, [0.5, 65504.0]),
        (DataType.BFLOAT16, [1.5, -3.0]),
        (DataType.FLOAT8E4M3FN, [0.5, 448.0]),
        (DataType.INT64, [-(2**63), 2**63 - 1]),
        (DataType.UINT64, [2**64 - 1, 0]),
        (DataType.INT4, [-8, 7, 0]),
        (DataType.UINT4, [15, 0, 1]),
        (DataType.BOOL, [True, False]),
        (DataType.COMPLEX128, [1 + 2j, float("nan")]),
        (DataType.STRING, ["", "a,b", 'q"uote', "line\nbreak", "\u00fcnicode"]),
    ],
)
def test_tensor_values_round_trip_exactly(dtype: DataType, values: list[object]) -> None:
    arr = np.array(values, dtype=object if dtype == DataType.STRING else dtype.numpy())
    g = Graph(name="g")
    v = g.constant(Tensor(arr, dtype=dtype), name="c")
    g.outputs.append(v)
    text = ir.print_graph(g, full_tensors=True)
    back = ir.parse_graph(text).initializers["c"].const_value
    assert back.dtype == dtype and back.shape == (len(values),)
    if dtype == DataType.STRING:
        assert list(back.numpy()) == values
    else:
        assert bytes(back.raw_bytes()) == bytes(Tensor(arr, dtype=dtype).raw_bytes())


def test_scalar_and_empty_tensors() -> None:
    g = Graph(name="g")
    g.outputs.append(g.constant(np.array(2.5, np.float32), name="scalar"))
    g.outputs.append(g.constant(np.zeros((0, 3), np.int64), name="empty"))
    text = ir.print_graph(g)
    assert "init %scalar: float32[] = float32[] [2.5]" in text
    assert "init %empty: int64[0,3] = int64[0,3] []" in text
    assert ir.print_graph(ir.parse_graph(text)) == text


# -- subgraphs, functions and metadata ------------------------------------------------------------
CONTROL_FLOW = """
<ir_version: 9, opset_import: ["" : 18, "local" : 1], producer_name: "hand", doc_string: "model doc",
 metadata_props: ["k": "v"]>
main (float[2] x, bool c, int64 n) => (float[2] y, float[2] s) {
  a = Relu(x)
  y = If(c) <
    then_branch = then_g () => (float[2] t) { t = Add(a, x) },
    else_branch = else_g () => (float[2] e) { e = local.Scale<alpha: float = 2.0>(a) }
  >
  cond0 = Constant<value = bool {1}>()
  s = Loop(n, cond0, x) <
    body = body_g (int64 it, bool cin, float[2] acc) => (bool cout, float[2] acc2) {
      cout = Identity(cin)
      acc2 = Add(acc, a)
    }
  >
}
<domain: "local", opset_import: ["" : 18]>
Scale <alpha> (v) => (w) {
  k = Constant<value_float: float = @alpha>()
  w = Mul(v, k)
}
"""


def control_flow_proto() -> onnx.ModelProto:
    proto = parser.parse_model(CONTROL_FLOW)
    onnx.checker.check_model(proto)
    return proto


def test_golden_subgraphs_and_functions() -> None:
    text = ir.print_model(ir.from_onnx(control_flow_proto()))
    assert text == (
        'model ir_version 9 producer "hand" "" domain "" version 0\n'
        'doc "model doc"\n'
        'opset "" 18\n'
        'opset "local" 1\n'
        'meta "k" "v"\n'
        'function "local" "Scale" opset "" 18 attrs["alpha"] graph "Scale" (%v: ?) -> (%w: ?) {\n'
        "  %k = Constant<value_float=@alpha(float)>()\n"
        "  %w = Mul(%v, %k)\n"
        "}\n"
        'graph "main" (%x: float32[2], %c: bool[], %n: int64[]) -> (%y: float32[2], %s: float32[2]) {\n'
        "  %a = Relu(%x)\n"
        '  %y: float32[2] = If<then_branch=graph "then_g" () -> (%t: float32[2]) {\n'
        "    %t: float32[2] = Add(%a, %x)\n"
        '  }, else_branch=graph "else_g" () -> (%e: float32[2]) {\n'
        "    %e: float32[2] = local::Scale<alpha=2.0>(%a)\n"
        "  }>(%c)\n"
        "  %cond0 = Constant<value=tensor bool[] [true]>()\n"
        '  %s: float32[2] = Loop<body=graph "body_g" (%it: int64[], %cin: bool[], %acc: float32[2]) -> '
        "(%cout: bool[], %acc2: float32[2]) {\n"
        "    %cout: bool[] = Identity(%cin)\n"
        "    %acc2: float32[2] = Add(%acc, %a)\n"
        "  }>(%n, %cond0, %x)\n"
        "}\n"
    )


def test_parsed_control_flow_model_is_valid_ir_and_runs() -> None:
    proto = control_flow_proto()
    parsed = roundtrip(ir.from_onnx(proto))
    ir.verify(parsed)
    # Outer-scope reads resolve to the outer value object, and count as its uses.
    a = next(n for n in parsed.graph if n.op_type == "Relu").outputs[0]
    readers = {(n.op_type, n.graph.name) for n, _ in a.uses()}
    assert readers == {("Add", "then_g"), ("Scale", "else_g"), ("Add", "body_g")}
    assert parsed.functions[0].attributes == ["alpha"]
    ref = next(iter(parsed.functions[0].graph)).attributes["value_float"]
    assert (ref.ref_attr_name, ref.type) == ("alpha", AttrType.FLOAT)
    feeds = {"x": np.array([1.0, -2.0], np.float32), "c": np.array(True), "n": np.array(3, np.int64)}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    outs = []
    for p in (proto, ir.to_onnx(parsed)):
        sess = ort.InferenceSession(p.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, feeds))
    for a_, b_ in zip(*outs):
        np.testing.assert_array_equal(a_, b_)


def test_metadata_doc_and_names_round_trip() -> None:
    g = small_graph()
    g.doc_string = "graph doc"
    g.metadata_props = {"z": "1", "a": "2"}
    n = next(iter(g))
    n.doc_string = "node doc"
    n.metadata_props = {"k": "v"}
    m = Model(g, producer_name="p", producer_version="1.0", domain="org.test", model_version=7, doc_string="d")
    m.metadata_props = {"author": "me"}
    f_body = Graph([Value("u")], name="F")
    f_node = f_body.append(Node("Neg", [f_body.inputs[0]], outputs=["o"]))
    f_body.outputs.append(f_node.outputs[0])
    m.functions.append(ir.Function(
        "dom", "F", f_body, attributes=["beta"], attribute_defaults=[Attr("beta", AttrType.FLOAT, 0.5)],
        opset_imports={"": 18}, overload="o1", doc_string="fdoc",
    ))
    again = roundtrip(m)
    assert again.graph.metadata_props == {"z": "1", "a": "2"}
    assert next(iter(again.graph)).metadata_props == {"k": "v"}
    f = again.functions[0]
    assert (f.domain, f.name, f.overload, f.doc_string, f.opset_imports) == ("dom", "F", "o1", "fdoc", {"": 18})
    assert f.attribute_defaults[0].value == 0.5
    assert (again.producer_version, again.domain, again.model_version) == ("1.0", "org.test", 7)


def test_input_with_default_value_round_trips() -> None:
    x = Value("x", TensorType(DataType.FLOAT, (2,)))
    g = Graph([x], [x], name="g")
    x.const_value = Tensor(np.array([1.0, 2.0], np.float32))
    g.initializers["x"] = x
    again = roundtrip(Model(g)).graph
    v = again.inputs[0]
    assert v.is_graph_input() and v.is_initializer() and again.outputs == [v]


def test_forward_reference_parses_and_sort_repairs_it() -> None:
    x = Value("x", TensorType(DataType.FLOAT, (1,)))
    a = Node("Relu", [x], outputs=["a"])
    b = Node("Neg", [a.outputs[0]], outputs=["b"])
    g = Graph([x], [b.outputs[0]], [b, a], name="g")  # printed out of order
    text = ir.print_graph(g)
    again = ir.parse_graph(text)
    assert ir.print_graph(again) == text
    again.sort()
    ir.verify(again)


# -- determinism ----------------------------------------------------------------------------------
def test_printing_is_deterministic() -> None:
    proto = control_flow_proto()
    m1, m2 = ir.from_onnx(proto), ir.from_onnx(proto)
    assert ir.print_model(m1) == ir.print_model(m1) == ir.print_model(m2)
    assert "0x" not in ir.print_model(m1)
    g1 = small_graph()
    g2 = small_graph()
    g2.metadata_props = {}
    g1.metadata_props = {"b": "1", "a": "2"}
    g2.metadata_props["a"] = "2"
    g2.metadata_props["b"] = "1"
    assert ir.print_graph(g1) == ir.print_graph(g2)


def test_print_of_lowered_model_matches_across_serialization() -> None:
    proto = control_flow_proto()
    reloaded = onnx.load_from_string(proto.SerializeToString())
    assert ir.print_model(ir.from_onnx(proto)) == ir.print_model(ir.from_onnx(reloaded))
    assert ir.print_model(ir.from_onnx(ir.to_onnx(ir.from_onnx(proto)))) == ir.print_model(ir.from_onnx(proto))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_backend_node_models_round_trip() -> None:
    from onnx.backend.test.case.node import collect_testcases

    count = 0
    for case in collect_testcases(None):
        if case.model is None:
            continue
        try:
            m = ir.from_onnx(case.model)
        except ir.IRError:
            continue
        roundtrip(m)
        count += 1
    assert count > 1000


# -- parse errors ---------------------------------------------------------------------------------
def test_elided_tensor_cannot_be_parsed() -> None:
    g = Graph(name="g")
    g.outputs.append(g.constant(np.arange(64, dtype=np.float32), name="big"))
    with pytest.raises(ir.IRError, match="full_tensors=True"):
        ir.parse_graph(ir.print_graph(g))


@pytest.mark.parametrize(
    "text, where, message",
    [
        ('graph "g" (%x: float32[1]) -> (%y: ?) {\n  %y = Relu(%x\n}', "3:1", "expected"),
        ('graph "g" (%x: float33[1]) -> () {\n}', "1:16", "unknown element type 'float33'"),
        ('graph "g" (%x: float32[1]) -> (%y: ?) {\n  %y = Relu(%nope)\n}', "2:13", "%nope is read but never defined"),
        ('graph "g" (%x: float32[1]) -> () {\n  %x = Relu(%x)\n}', "2:3", "%x is defined twice"),
        ('graph "g" () -> () {\n  init %c: float32[2] = float32[2] [1.0]\n}', "2:25", "needs 2 values, got 1"),
        ('graph "g" () -> () {\n  %y = Relu<a=$>()\n}', "2:15", "unexpected character '\\$'"),
        ('graph "g" () -> () {\n  %y = Relu()\n', "3:1", "missing '}'"),
        ('graph "g" () -> () {\n}\nextra', "3:1", "expected end of input"),
    ],
)
def test_parse_errors_point_at_line_and_column(text: str, where: str, message: str) -> None:
    with pytest.raises(ir.ParseError, match=message) as e:
        ir.parse_graph(text)
    assert str(e.value).startswith(where + ":"), str(e.value)
    assert isinstance(e.value, ir.IRError)


def test_parse_model_rejects_graph_text() -> None:
    with pytest.raises(ir.ParseError, match="1:1: expected 'model'"):
        ir.parse_model(ir.print_graph(small_graph()))
