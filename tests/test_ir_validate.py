"""``ir.validate``: one bad model per rule, each refused with one line naming the node, its op and the problem.

Plus the structural rules that lowering enforces (they raise subclasses of ``ir.InvalidModelError``
too), the schema lookup (``ir.op_signature``), and a model that is valid but fails at run time in
onnxruntime, which the CLI reports in one line.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import textwrap
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, parser

import ir

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes: list[Any], inputs: list[Any] | None = None, outputs: list[Any] | None = None,
           inits: list[Any] | None = None, opset: int | None = 17, extra_opsets: dict[str, int] | None = None,
           value_info: list[Any] | None = None, functions: list[Any] | None = None) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "g",
        inputs if inputs is not None else [helper.make_tensor_value_info("x", F, [2, 3])],
        outputs if outputs is not None else [helper.make_tensor_value_info("y", F, None)],
        inits or [], value_info=value_info or [],
    )
    opsets = ([helper.make_opsetid("", opset)] if opset is not None else [])
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    m = helper.make_model(g, opset_imports=opsets, functions=functions or [])
    m.ir_version = 8
    return m


def _text(src: str) -> onnx.ModelProto:
    return parser.parse_model(textwrap.dedent(src))


def _refused(proto: onnx.ModelProto, *needles: str, **kwargs: Any) -> str:
    """Validate ``proto``: it must raise InvalidModelError with one line holding every needle."""
    with pytest.raises(ir.InvalidModelError) as e:
        ir.validate(ir.from_onnx(proto), **kwargs)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def _valid(proto: onnx.ModelProto, **kwargs: Any) -> None:
    ir.validate(ir.from_onnx(proto), **kwargs)


def _node(op: str, inputs: list[str], outputs: list[str] | None = None, **attrs: Any) -> Any:
    return helper.make_node(op, inputs, outputs or ["y"], name="n", **attrs)


# --------------------------------------------------------------------------------------------- #
# Opsets and domains
# --------------------------------------------------------------------------------------------- #


def test_a_valid_model_passes() -> None:
    _valid(_model([_node("Relu", ["x"])]), known_domains=set(), max_opset=23)


def test_op_not_in_the_opset() -> None:
    _refused(_model([_node("Gelu", ["x"])], opset=17), "node 'n' (Gelu)", "not defined in ONNX opset 17")


def test_deprecated_op() -> None:
    scales = numpy_helper.from_array(np.ones(2, np.float32), "s")
    _refused(_model([_node("Upsample", ["x", "s"])], inits=[scales], opset=11), "node 'n' (Upsample)", "deprecated")


def test_no_onnx_opset_imported() -> None:
    _refused(_model([_node("Relu", ["x"])], opset=None), "node 'n' (Relu)", "imports no ONNX opset")


def test_opset_newer_than_onnx_knows() -> None:
    from ir.lower import MAX_OPSET

    _refused(_model([_node("Relu", ["x"])], opset=MAX_OPSET + 1), f"opset {MAX_OPSET + 1}", "newer")


def test_opset_above_the_target() -> None:
    _refused(_model([_node("Relu", ["x"])], opset=21), "opset 21", "target x86 supports up to opset 20",
             max_opset=20, target="x86")


def test_opset_below_one() -> None:
    _refused(_model([_node("Relu", ["x"])], extra_opsets={"com.microsoft": 0}), "imports opset 0", "com.microsoft")


def test_custom_domain_not_imported() -> None:
    _refused(_model([helper.make_node("Frob", ["x"], ["y"], name="n", domain="com.example")]),
             "node 'n' (com.example::Frob)", "imports no opset for domain 'com.example'")


def test_custom_domain_unknown_to_the_target() -> None:
    m = _model([helper.make_node("Frob", ["x"], ["y"], name="n", domain="com.example")],
               extra_opsets={"com.example": 1})
    with pytest.raises(ir.UnknownDomainError) as e:
        ir.validate(ir.from_onnx(m), known_domains={"com.microsoft"}, target="x86")
    assert e.value.domain == "com.example"
    assert "node 'n' (com.example::Frob): domain 'com.example' is not provided by target x86" in str(e.value)
    _valid(m)  # no target: every domain is accepted
    _valid(m, known_domains={"com.example"})


def test_local_function_domain_is_known() -> None:
    f = helper.make_function("local.fn", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                             [helper.make_opsetid("", 17)])
    m = _model([helper.make_node("Twice", ["x"], ["y"], name="n", domain="local.fn")],
               extra_opsets={"local.fn": 1}, functions=[f])
    _valid(m, known_domains=set())


def test_error_inside_a_function_body() -> None:
    f = helper.make_function("local.fn", "Bad", ["a"], ["b"], [helper.make_node("Add", ["a"], ["b"], name="inner")],
                             [helper.make_opsetid("", 17)])
    m = _model([helper.make_node("Bad", ["x"], ["y"], name="n", domain="local.fn")],
               extra_opsets={"local.fn": 1}, functions=[f])
    _refused(m, "node 'inner' (Add)", "1 inputs, but Add 14 takes exactly 2")


def test_ir_version() -> None:
    m = _model([_node("Relu", ["x"])])
    m.ir_version = 0
    _refused(m, "no IR version")
    m.ir_version = 99
    _refused(m, "IR version 99 is newer")


# --------------------------------------------------------------------------------------------- #
# Nodes against their schema
# --------------------------------------------------------------------------------------------- #


def test_too_few_inputs() -> None:
    _refused(_model([_node("Add", ["x"])]), "node 'n' (Add)", "1 inputs, but Add 14 takes exactly 2")


def test_too_many_inputs() -> None:
    _refused(_model([_node("Relu", ["x", "x"])]), "node 'n' (Relu)", "2 inputs, but Relu 14 takes exactly 1")


def test_required_input_left_empty() -> None:
    _refused(_model([_node("Add", ["", "x"])]), "node 'n' (Add)", "input 0 (A) is required but empty")


def test_optional_input_may_be_empty() -> None:
    _valid(_model([_node("Clip", ["x", "", ""])]))


def test_too_many_outputs() -> None:
    _refused(_model([_node("Relu", ["x"], ["y", "z"])]), "node 'n' (Relu)", "2 outputs, but Relu 14 has exactly 1")


def test_unknown_attribute() -> None:
    _refused(_model([_node("Shape", ["x"], axis=0)]), "node 'n' (Shape)", "unknown attribute 'axis'", "end, start")


def test_attribute_of_the_wrong_kind() -> None:
    _refused(_model([_node("Shape", ["x"], end="last")]), "node 'n' (Shape)",
             "attribute 'end' is STRING, but Shape 15 expects INT")


def test_required_attribute_missing() -> None:
    _refused(_model([_node("Cast", ["x"])]), "node 'n' (Cast)", "required attribute 'to' is missing")


def test_attribute_given_twice() -> None:
    n = _node("Softmax", ["x"], axis=1)
    n.attribute.append(helper.make_attribute("axis", 0))
    _refused(_model([n]), "Softmax 'n'", "attribute 'axis' is given twice")


def test_attribute_without_a_value() -> None:
    n = _node("Softmax", ["x"])
    n.attribute.add(name="axis")
    _refused(_model([n]), "Softmax 'n'", "attribute 'axis'", "has no value")


def test_cast_to_an_unknown_type() -> None:
    _refused(_model([_node("Cast", ["x"], to=99)]), "node 'n' (Cast)", "'to' = 99 is not an element type")


def test_constant_needs_one_value() -> None:
    _refused(_model([_node("Constant", [])], inputs=[]), "node 'n' (Constant)", "exactly one value attribute, it has 0")
    two = _node("Constant", [], value_float=1.0, value_int=1)
    _refused(_model([two], inputs=[]), "node 'n' (Constant)", "it has 2")


def test_transpose_perm() -> None:
    _refused(_model([_node("Transpose", ["x"], perm=[0, 0])]), "node 'n' (Transpose)", "perm [0, 0] is not a permutation")
    _refused(_model([_node("Transpose", ["x"], perm=[2, 1, 0])]), "perm [2, 1, 0]", "rank-2 input")
    _valid(_model([_node("Transpose", ["x"], perm=[1, 0])]))


@pytest.mark.parametrize("op, axis, ok", [
    ("Concat", 1, True), ("Concat", -2, True), ("Concat", 2, False), ("Concat", -3, False),
    ("Softmax", -1, True), ("Softmax", 5, False), ("Flatten", 2, True), ("Flatten", 3, False),
    ("Gather", -3, False),
])
def test_axis_within_rank(op: str, axis: int, ok: bool) -> None:
    inputs = {"Gather": ["x", "i"]}.get(op, ["x"])
    inits = [numpy_helper.from_array(np.array([0], np.int64), "i")] if op == "Gather" else []
    m = _model([_node(op, inputs, axis=axis)], inits=inits)
    if ok:
        _valid(m)
    else:
        _refused(m, f"node 'n' ({op})", f"axis {axis} is out of range for a rank-2 input")


def test_axis_is_not_checked_when_the_rank_is_unknown() -> None:
    _valid(_model([_node("Concat", ["x"], axis=7)], inputs=[helper.make_tensor_value_info("x", F, None)]))


def test_unsqueeze_axes_attribute() -> None:
    _valid(_model([_node("Unsqueeze", ["x"], axes=[0, 3])], opset=11))  # the output has rank 4
    _refused(_model([_node("Unsqueeze", ["x"], axes=[0, 4])], opset=11), "node 'n' (Unsqueeze)", "axes [0, 4]")
    _refused(_model([_node("Unsqueeze", ["x"], axes=[1, -3])], opset=11), "(or repeated)")


def test_input_of_a_type_the_op_does_not_take() -> None:
    w = numpy_helper.from_array(np.zeros((4, 3), np.float32), "w")
    m = _model([_node("Gather", ["w", "x"])], inits=[w])
    _refused(m, "node 'n' (Gather)", "input 1 (indices, %x) is FLOAT, which Gather does not take there")


def test_type_parameter_bound_to_two_types() -> None:
    b = numpy_helper.from_array(np.zeros(3, np.int64), "b")
    _refused(_model([_node("Add", ["x", "b"])], inits=[b]), "node 'n' (Add)",
             "inputs 0 and 1 share type T but are FLOAT and INT64")


def test_types_flow_through_untyped_values() -> None:
    # Shape makes int64 (the schema says so) and nothing declares %s: Add(x, s) still mixes float and int64.
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"), _node("Add", ["x", "s"])]
    _refused(_model(nodes), "node 'n' (Add)", "FLOAT and INT64")


def test_declared_output_type_contradicts_the_op() -> None:
    vi = [helper.make_tensor_value_info("s", TensorProto.INT32, [2])]
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"), _node("Cast", ["s"], to=F)]
    _refused(_model(nodes, value_info=vi), "node 'shape' (Shape)", "output 0 (%s) is declared INT32, but Shape makes INT64")


# --------------------------------------------------------------------------------------------- #
# Graphs
# --------------------------------------------------------------------------------------------- #


def test_two_nodes_with_one_name() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="same"), helper.make_node("Relu", ["a"], ["y"], name="same")]
    _refused(_model(nodes), "node 'same' (Relu)", "another node of graph 'g' has the same name")


def test_graph_without_outputs() -> None:
    _refused(_model([_node("Relu", ["x"])], outputs=[]), "graph 'g' has no outputs")


def test_graph_input_without_element_type() -> None:
    _refused(_model([_node("Relu", ["x"])], inputs=[helper.make_tensor_value_info("x", 0, [2])]),
             "graph input %x has no element type")


def test_error_in_a_subgraph_names_it() -> None:
    m = _text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[2] x) => (float[2] y) {
          y = If <then_branch = g1 () => (float[2] t) { t = Add(x) }, else_branch = g2 () => (float[2] e) { e = Neg(x) }> (c)
        }
    """)
    m.graph.node[0].name = "branch"
    _refused(m, "(Add) writing %t in subgraph 'g1' of node 'branch' (If)", "1 inputs, but Add 14")


def test_value_names_shadowed_across_scopes() -> None:
    m = _text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c, float[2] x) => (float[2] y) {
          t = Neg(x)
          y = If <then_branch = g1 () => (float[2] t) { t = Abs(x) }, else_branch = g2 () => (float[2] e) { e = Neg(x) }> (c)
        }
    """)
    _refused(m, "value name %t")


# --------------------------------------------------------------------------------------------- #
# Structure and tensors (refused while lowering: every error is an InvalidModelError)
# --------------------------------------------------------------------------------------------- #


def _lower_refused(proto: onnx.ModelProto, cls: type[ir.InvalidModelError], *needles: str) -> None:
    with pytest.raises(cls) as e:
        ir.from_onnx(proto)
    assert isinstance(e.value, ir.InvalidModelError) and "\n" not in str(e.value)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_cycle() -> None:
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="first"), helper.make_node("Relu", ["a"], ["b"], name="second")]
    _lower_refused(_model(nodes, outputs=[helper.make_tensor_value_info("b", F, None)]), ir.CycleError, "cycle")


def test_value_read_before_anything_defines_it() -> None:
    _lower_refused(_model([_node("Relu", ["ghost"])]), ir.UndefinedValueError, "'n'", "%ghost")


def test_two_producers_of_one_value() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="a"), helper.make_node("Neg", ["x"], ["y"], name="b")]
    _lower_refused(_model(nodes), ir.DuplicateNameError, "%y", "'b'")


def test_initializer_bytes_do_not_fit_dims_and_dtype() -> None:
    w = numpy_helper.from_array(np.zeros(3, np.float32), "w")
    w.dims[:] = [4]
    _lower_refused(_model([_node("Add", ["x", "w"])], inits=[w]), ir.InvalidModelError,
                   "initializer %w", "12 bytes of data for FLOAT[4], which needs 16")
    w = numpy_helper.from_array(np.zeros(3, np.float32), "w")
    w.data_type = I64
    _lower_refused(_model([_node("Add", ["x", "w"])], inits=[w]), ir.InvalidModelError, "which needs 24")


def test_typed_data_count_does_not_fit_dims() -> None:
    w = TensorProto(name="w", data_type=F, dims=[2, 3], float_data=[1.0, 2.0])
    _lower_refused(_model([_node("Add", ["x", "w"])], inits=[w]), ir.InvalidModelError,
                   "initializer %w", "2 values of data for FLOAT[2, 3]")


def test_external_data_length_does_not_fit(tmp_path: pathlib.Path) -> None:
    w = TensorProto(name="w", data_type=F, dims=[1 << 30])  # 4 GB declared...
    w.data_location = TensorProto.EXTERNAL
    for k, v in {"location": "w.bin", "offset": "0", "length": "64"}.items():  # ... 64 bytes stored
        w.external_data.add(key=k, value=v)
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    p = tmp_path / "m.onnx"
    p.write_bytes(_model([_node("Add", ["x", "w"])], inits=[w]).SerializeToString())
    with pytest.raises(ir.InvalidModelError, match=r"initializer %w: external data at offset 0, length 64 does not fit"):
        ir.load(p)


def test_missing_external_file_of_a_large_model(tmp_path: pathlib.Path) -> None:
    w = TensorProto(name="w", data_type=F, dims=[3 << 28])  # 3 GB, in a file that is not there
    w.data_location = TensorProto.EXTERNAL
    for k, v in {"location": "weights.bin", "offset": "0", "length": str(3 << 30)}.items():
        w.external_data.add(key=k, value=v)
    p = tmp_path / "m.onnx"
    p.write_bytes(_model([_node("Add", ["x", "w"])], inits=[w]).SerializeToString())
    with pytest.raises(ir.InvalidModelError, match=r"initializer %w: .*weights.bin does not exist"):
        ir.load(p)


def test_string_count_does_not_fit_dims() -> None:
    s = TensorProto(name="s", data_type=TensorProto.STRING, dims=[3], string_data=[b"a", b"b"])
    _lower_refused(_model([_node("Identity", ["s"])], inputs=[], inits=[s]), ir.InvalidModelError, "2 strings")


def test_tensor_without_element_type() -> None:
    w = numpy_helper.from_array(np.zeros(3, np.float32), "w")
    w.data_type = 0
    _lower_refused(_model([_node("Add", ["x", "w"])], inits=[w]), ir.InvalidModelError, "no element type")


# --------------------------------------------------------------------------------------------- #
# Schema lookup, cost, and the old entry point
# --------------------------------------------------------------------------------------------- #


def test_op_signature_is_plain_cached_data() -> None:
    s = ir.op_signature("Split", "", 18)
    assert isinstance(s, ir.OpSignature) and s.since_version == 18
    assert [(p.name, p.option) for p in s.inputs] == [("input", "single"), ("split", "optional")]
    assert s.output(5) is s.outputs[0] and s.outputs[0].option == "variadic"
    assert s.attributes["axis"].type == ir.AttrType.INT and not s.attributes["axis"].required
    assert TensorProto.INT64 in s.inputs[1].tensor_types and s.inputs[0].type_param == "T"
    assert ir.op_signature("Split", "", 18) is s
    assert ir.op_signature("Gelu", "", 17) is None and ir.op_signature("Frob", "com.example", 1) is None
    assert ir.op_signature("Relu", "ai.onnx", 17) == ir.op_signature("Relu", "", 17)


def test_check_opsets_is_the_opset_rule() -> None:
    with pytest.raises(ir.InvalidModelError, match="not defined in ONNX opset 17"):
        ir.check_opsets(ir.from_onnx(_model([_node("Gelu", ["x"])])))
    ir.check_opsets(ir.from_onnx(_model([_node("Add", ["x"])])))  # arity is validate's job


# --------------------------------------------------------------------------------------------- #
# Valid, but onnxruntime fails on it at run time
# --------------------------------------------------------------------------------------------- #


def _expand_model() -> onnx.ModelProto:
    """``Expand(x[n, 3], shape=[4, 3])``: valid ONNX, but n=2 does not broadcast to 4."""
    shape = numpy_helper.from_array(np.array([4, 3], np.int64), "shape")
    return _model([helper.make_node("Expand", ["x", "shape"], ["y"], name="expand")],
                  inputs=[helper.make_tensor_value_info("x", F, ["n", 3])], inits=[shape])


def _main(*args: str) -> tuple[int, str, str]:
    from passes.tools.compile import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_valid_model_that_fails_at_run_time(tmp_path: pathlib.Path) -> None:
    _valid(_expand_model())
    src, out = tmp_path / "expand.onnx", tmp_path / "out.onnx"
    src.write_bytes(_expand_model().SerializeToString())
    code, _, err = _main(str(src), "-o", str(out), "--quiet")
    assert code == 2 and not out.exists()
    assert err.splitlines() == [
        "error: the original model does not run in onnxruntime (inputs x[2, 3]): node 'expand' (Expand): "
        "invalid expand shape"
    ]


def test_compile_model_raises_invalid_model_error(tmp_path: pathlib.Path) -> None:
    import passes

    src = tmp_path / "expand.onnx"
    src.write_bytes(_expand_model().SerializeToString())
    with pytest.raises(ir.InvalidModelError, match=r"^the original model does not run in onnxruntime"):
        passes.compile_model(src, "x86")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(_model([_node("Shape", ["x"], axis=0)]).SerializeToString())
    with pytest.raises(ir.InvalidModelError, match=re.escape("node 'n' (Shape): unknown attribute 'axis'")):
        passes.compile_model(bad, "x86")
