"""The pattern language: every construct matched and refused, matching never mutates, commits are all-or-nothing."""

from __future__ import annotations

import math

import numpy as np
import onnx.parser
import pytest

import ir
import targets
from conftest import apply_rules_checked, op_types, ort_run
from passes import PassContext, PassManager
from passes.framework.pattern import PatternRule, absent_or, capture
from passes.framework.registry import register_rules
from passes.framework.rules import NoMatch, RulesPass

X86 = targets.get("x86")


def _lower(body: str, inputs: str = "float[2,4] x", outputs: str = "float[2,4] y", opset: int = 17) -> ir.Model:
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
    g ({inputs}) => ({outputs}) {{
      {body}
    }}"""
    return ir.from_onnx(onnx.parser.parse_model(text))


def _apply(model: ir.Model, *rules: PatternRule, target=X86) -> tuple[int, PassContext]:
    return apply_rules_checked(model, *rules, target=target)


_ops = op_types


def silu(op, x):
    return op.Mul(x, op.Sigmoid(x))


def silu_fused(op, x):
    return op.QuickGelu(x, alpha=1.0, _domain="com.microsoft")


SILU = PatternRule("silu", silu, silu_fused, requires={"com.microsoft": ["QuickGelu"]})


@pytest.mark.parametrize("mul", ["Mul(x, s)", "Mul(s, x)"])
def test_commutative_operands_match_in_both_orders(mul: str) -> None:
    model = _lower(f"s = Sigmoid(x)\n y = {mul}")
    assert _apply(model, SILU)[0] == 1
    assert _ops(model) == ["QuickGelu"]
    assert model.opset("com.microsoft") == 1
    assert model.graph.outputs[0].name == "y"  # the interface keeps its name


def test_a_variable_used_twice_must_bind_one_value() -> None:
    model = _lower("s = Sigmoid(x)\n y = Mul(z, s)", inputs="float[2,4] x, float[2,4] z")
    n, ctx = _apply(model, SILU)
    assert n == 0 and _ops(model) == ["Sigmoid", "Mul"]


def test_target_requirement_is_a_near_miss() -> None:
    model = _lower("s = Sigmoid(x)\n y = Mul(x, s)")
    n, ctx = _apply(model, SILU, target=targets.get("onnx"))
    assert n == 0
    assert any("provides no com.microsoft::QuickGelu" in d.message for d in ctx.diagnostics)


def test_interior_value_read_elsewhere_is_refused() -> None:
    model = _lower("s = Sigmoid(x)\n m = Mul(x, s)\n y = Add(m, s)")
    n, ctx = _apply(model, SILU)
    assert n == 0 and "Sigmoid" in _ops(model)


def cube(op, x):
    return op.Pow(x, 3.0) | op.product(x, x, x)


def cube_fused(op, x):
    return op.Mul(x, op.Mul(x, x))


@pytest.mark.parametrize("body", [
    "t = Constant <value = float {3.0}> ()\n y = Pow(x, t)",
    "a = Mul(x, x)\n y = Mul(a, x)",
    "a = Mul(x, x)\n y = Mul(x, a)",
])
def test_alternatives_and_product_associations(body: str) -> None:
    rule = PatternRule("cube", cube, lambda op, x: op.Identity(x))
    model = _lower(body)
    assert _apply(model, rule)[0] == 1
    assert [op for op in _ops(model) if op != "Constant"] == ["Identity"]


@pytest.mark.parametrize("body", [
    "h = Constant <value = float {0.5}> ()\n a = Mul(x, h)\n y = Mul(a, t)",
    "h = Constant <value = float {0.5}> ()\n a = Mul(h, t)\n y = Mul(x, a)",
    "two = Constant <value = float {2.0}> ()\n a = Mul(t, x)\n y = Div(a, two)",
    "q = Constant <value = float {0.25}> ()\n two = Constant <value = float {2.0}> ()\n a = Mul(x, q)\n"
    " b = Mul(two, a)\n y = Mul(t, b)",
])
def test_product_matches_any_order_association_and_division(body: str) -> None:
    rule = PatternRule("half", lambda op, x, t: op.product(0.5, x, t), lambda op, x, t: op.Mul(x, t))
    model = _lower(body, inputs="float[2,4] x, float[2,4] t")
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    t = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    before = ort_run(ir.to_onnx(model), {"x": x, "t": t})["y"]
    assert _apply(model, rule)[0] == 1
    assert [n for n in _ops(model) if n != "Constant"] == ["Mul"]
    # The replacement drops the 0.5: the product matched is exactly 0.5·x·t.
    np.testing.assert_allclose(ort_run(ir.to_onnx(model), {"x": x, "t": t})["y"] * 0.5, before, rtol=1e-6)


def test_product_with_the_wrong_scale_is_explained() -> None:
    rule = PatternRule("half", lambda op, x, t: op.product(0.5, x, t), lambda op, x, t: op.Mul(x, t))
    model = _lower("h = Constant <value = float {0.4}> ()\n a = Mul(x, h)\n y = Mul(a, t)",
                   inputs="float[2,4] x, float[2,4] t")
    n, ctx = _apply(model, rule)
    assert n == 0
    assert any("scaled by 0.4, not 0.5" in d.message for d in ctx.diagnostics)


def biased_relu(op, h):
    return op.Relu(op.Add(h, op.const(name="bias", ndim=1)) | h)


def fused_relu(op, h, bias):
    return op.Relu(h) if bias is None else op.Relu(op.Add(h, bias), _domain="")


@pytest.mark.parametrize("with_bias", [True, False])
def test_optional_node_binds_none_when_absent(with_bias: bool) -> None:
    seen: list[object] = []

    def replacement(op, h, bias):
        seen.append(bias)
        return op.Identity(h)

    rule = PatternRule("relu", biased_relu, replacement)
    body = "b = Constant <value = float[4] {1, 2, 3, 4}> ()\n a = Add(x, b)\n y = Relu(a)" if with_bias else "y = Relu(x)"
    model = _lower(body)
    assert _apply(model, rule)[0] == 1
    assert (seen[0] is not None) == with_bias


def test_constant_predicate_and_tolerance() -> None:
    rule = PatternRule("sqrt2", lambda op, x: op.Div(x, op.const(math.sqrt(2), rtol=1e-4)), lambda op, x: op.Identity(x))
    assert _apply(_lower("c = Constant <value = float {1.4142}> ()\n y = Div(x, c)"), rule)[0] == 1
    assert _apply(_lower("c = Constant <value = float {1.41}> ()\n y = Div(x, c)"), rule)[0] == 0


def test_attribute_literal_predicate_and_capture() -> None:
    seen: dict[str, object] = {}

    def pattern(op, x):
        return op.Softmax(x, axis=absent_or(-1), _name="sm") | op.LogSoftmax(x, axis=capture("ax"))

    def replacement(op, x, ax=None):
        seen["ax"] = ax
        return op.Identity(x)

    rule = PatternRule("sm", pattern, replacement)
    assert _apply(_lower("y = Softmax <axis = -1> (x)"), rule)[0] == 1
    assert _apply(_lower("y = Softmax(x)"), rule)[0] == 1
    assert _apply(_lower("y = Softmax <axis = 0> (x)"), rule)[0] == 0
    assert _apply(_lower("y = LogSoftmax <axis = 0> (x)"), rule)[0] == 1
    assert seen["ax"] == 0


def test_domain_constraint() -> None:
    rule = PatternRule("qg", lambda op, x: op.QuickGelu(x, _domain="com.microsoft"), lambda op, x: op.Identity(x))
    model = ir.from_onnx(onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[2,4] x) => (float[2,4] y) { y = com.microsoft.QuickGelu(x) }"""))
    assert _apply(model, rule)[0] == 1


def test_check_refusal_backtracks_into_the_next_alternative() -> None:
    taken: list[bool] = []

    def replacement(op, h, bias):
        taken.append(bias is not None)
        return op.Elu(h)

    rule = PatternRule("relu", biased_relu, replacement, check=lambda m, ctx: m.bias is None or "no bias wanted")
    model = _lower("b = Constant <value = float[4] {1, 2, 3, 4}> ()\n a = Add(x, b)\n y = Relu(a)")
    assert _apply(model, rule)[0] == 1
    assert taken == [False]  # the bias alternative was refused; the plain one matched with h = a
    assert "Add" in _ops(model)


def test_check_refusal_is_a_near_miss_with_its_reason() -> None:
    rule = PatternRule("silu", silu, silu_fused, check=lambda m, ctx: "shapes do not fit")
    model = _lower("s = Sigmoid(x)\n y = Mul(x, s)")
    n, ctx = _apply(model, rule)
    assert n == 0
    assert [d.message for d in ctx.diagnostics] == ["silu: shapes do not fit"]


def test_matching_never_mutates_the_ir() -> None:
    model = _lower("s = Sigmoid(x)\n y = Mul(x, s)")
    before = ir.print_model(model)
    m = SILU.prepare(model).match(model.graph.nodes[-1], PassContext(target=X86))
    assert not isinstance(m, NoMatch) and m.x is model.graph.inputs[0]
    assert ir.print_model(model) == before


def test_a_failing_replacement_leaves_the_graph_untouched() -> None:
    def broken(op, x):
        op.Relu(x)
        raise RuntimeError("half-way")

    rule = PatternRule("broken", silu, broken)
    model = _lower("s = Sigmoid(x)\n y = Mul(x, s)")
    before = ir.print_model(model)
    with pytest.raises(RuntimeError, match="half-way"):
        _apply(model, rule)
    assert ir.print_model(model) == before
    ir.verify(model)


def test_replacement_may_return_a_bound_value() -> None:
    rule = PatternRule("double-neg", lambda op, x: op.Neg(op.Neg(x)), lambda op, x: x)
    model = _lower("a = Neg(x)\n b = Neg(a)\n y = Relu(b)")
    assert _apply(model, rule)[0] == 1
    assert _ops(model) == ["Relu"] and model.graph.nodes[0].inputs[0] is model.graph.inputs[0]


def test_model_output_never_becomes_a_graph_input() -> None:
    rule = PatternRule("double-neg", lambda op, x: op.Neg(op.Neg(x)), lambda op, x: x)
    model = _lower("a = Neg(x)\n y = Neg(a)")
    n, ctx = _apply(model, rule)
    assert n == 0 and _ops(model) == ["Neg", "Neg"] and model.graph.outputs[0].name == "y"


def test_replacement_asking_for_an_unbound_name_is_refused_at_construction() -> None:
    with pytest.raises(TypeError, match="does not bind"):
        PatternRule("bad", silu, lambda op, x, gamma: op.Identity(x))


def test_register_rules_makes_a_pipeline_pass() -> None:
    cls = register_rules("test-fuse-silu", [SILU], "x*Sigmoid(x) -> QuickGelu")
    assert issubclass(cls, RulesPass)
    model = _lower("s = Sigmoid(x)\n y = Mul(s, x)")
    records = PassManager("test-fuse-silu,dead-flow", check_modified=True).run(model, PassContext(target=X86))
    assert records[0].modified and records[0].stats == {"applied silu": 1}
    assert _ops(model) == ["QuickGelu"]
    # A second run finds nothing: the rule is idempotent.
    assert not PassManager("test-fuse-silu", check_modified=True).run(model, PassContext(target=X86))[0].modified


def test_float_attributes_compare_as_onnx_stores_them_and_a_wrong_one_is_explained() -> None:
    rule = PatternRule("hardswish", lambda op, x: op.Mul(x, op.HardSigmoid(x, alpha=1 / 6, beta=absent_or(0.5))),
                       lambda op, x: op.HardSwish(x))
    model = _lower("h = HardSigmoid <alpha = 0.16666667> (x)\n y = Mul(x, h)")  # alpha as float32
    assert _apply(model, rule)[0] == 1 and _ops(model) == ["HardSwish"]
    model = _lower("h = HardSigmoid <alpha = 0.2> (x)\n y = Mul(x, h)")
    n, ctx = _apply(model, rule)
    assert n == 0 and any("attribute alpha=0.2" in d.message for d in ctx.diagnostics)
