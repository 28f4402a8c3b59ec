"""Pattern rules that also replace a named interior value: the dict return, the interior-leak check,
where the new nodes go, model outputs keeping their names, all-or-nothing commits, and the
property strategy generating outside readers."""

from __future__ import annotations

import collections

import numpy as np
import onnx.parser
import pytest
from hypothesis import HealthCheck, given, settings

import ir
import targets
from conftest import apply_rules_checked, op_types, ort_run
from ir.testing import check_rule, recompute_uses, rule_cases
from passes import PassContext
from passes.framework.pattern import PatternRule
from passes.framework.rewriter import Rewriter
from passes.framework.rules import NoMatch, apply_rules

X86 = targets.get("x86")
_MS = "com.microsoft"


def _proto(body: str, inputs: str = "float[2,4] x, float[2,4] r", outputs: str = "float[2,4] y",
           inits: str = "") -> onnx.ModelProto:
    return onnx.parser.parse_model(f"""<ir_version: 10, opset_import: ["" : 17]>
    g ({inputs}) => ({outputs}) {inits} {{
      {body}
    }}""")


def _apply(model: ir.Model, *rules: PatternRule) -> tuple[int, PassContext]:
    return apply_rules_checked(model, *rules, target=X86)


_ops = op_types


def _same_numerics(proto: onnx.ModelProto, model: ir.Model, atol: float = 1e-6) -> None:
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in proto.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    ref, got = ort_run(proto.SerializeToString(), feeds), ort_run(ir.to_onnx(model).SerializeToString(), feeds)
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=atol, err_msg=k)


# ``Relu(x + r) * w`` with the sum named: the replacement computes the sum as one ``Sum`` (a
# different op, so the rule does not match its own output) and hands it to the sum's other readers.
def relu_sum(op, x, r, w):
    return op.Mul(op.Relu(op.Add(x, r, _name="sum")), w)


def relu_sum_fused(op, x, r, w, match):
    s = op.Sum(x, r)
    y = op.Mul(op.Relu(s), w)
    return {"out": y, "sum": s} if match.read_elsewhere("sum") else y


RULE = PatternRule("relu-sum", relu_sum, relu_sum_fused)
W = "<float[4] w = {1, 2, 3, 4}>"


def test_an_interior_value_read_elsewhere_is_replaced_and_its_readers_rewired() -> None:
    proto = _proto("s = Add(x, r)\n k = Relu(s)\n m = Mul(k, w)\n t = Tanh(s)\n y = Add(m, t)", inits=W)
    model = ir.from_onnx(proto)
    assert _apply(model, RULE)[0] == 1
    assert _ops(model) == ["Sum", "Relu", "Mul", "Tanh", "Add"]
    total = model.graph.nodes[0].outputs[0]
    assert sorted(u.op_type for u, _ in total.uses()) == ["Relu", "Tanh"]
    _same_numerics(proto, model)


def test_read_elsewhere_says_whether_a_named_value_leaves_the_match() -> None:
    seen: list[bool] = []

    def spy(op, x, r, w, match):
        seen.append(match.read_elsewhere("sum"))
        return relu_sum_fused(op, x, r, w, match)

    rule = PatternRule("spy", relu_sum, spy)
    for body, read in (("s = Add(x, r)\n k = Relu(s)\n y = Mul(k, w)", False),
                       ("s = Add(x, r)\n k = Relu(s)\n m = Mul(k, w)\n y = Add(m, s)", True)):
        model = ir.from_onnx(_proto(body, inits=W))
        seen.clear()
        assert _apply(model, rule)[0] == 1 and seen and set(seen) == {read}


def test_a_named_value_read_elsewhere_and_not_replaced_is_a_near_miss() -> None:
    rule = PatternRule("relu-sum", relu_sum, lambda op, x, r, w: op.Mul(op.Relu(op.Sum(x, r)), w))
    model = ir.from_onnx(_proto("s = Add(x, r)\n k = Relu(s)\n m = Mul(k, w)\n y = Add(m, s)", inits=W))
    n, ctx = _apply(model, rule)
    assert n == 0 and "Sum" not in _ops(model)
    assert [d.message for d in ctx.diagnostics] == [
        "relu-sum: %s of Add -> %s is read outside the match and the replacement does not replace it"]


def test_an_unnamed_interior_value_read_elsewhere_is_still_refused() -> None:
    # The Relu is not named: its value may not leave the match, whatever the replacement returns.
    model = ir.from_onnx(_proto("s = Add(x, r)\n k = Relu(s)\n m = Mul(k, w)\n y = Add(m, k)", inits=W))
    n, ctx = _apply(model, RULE)
    assert n == 0 and _ops(model) == ["Add", "Relu", "Mul", "Add"]
    assert any("%k of Relu" in d.message and "also read by Add" in d.message for d in ctx.diagnostics)


def test_the_new_nodes_go_before_a_reader_that_precedes_the_root() -> None:
    # Tanh(s) comes between the sum and the root: the Sum must be defined before it.
    proto = _proto("s = Add(x, r)\n t = Tanh(s)\n k = Relu(s)\n m = Mul(k, w)\n y = Add(m, t)", inits=W)
    model = ir.from_onnx(proto)
    assert _apply(model, RULE)[0] == 1
    assert _ops(model) == ["Sum", "Relu", "Mul", "Tanh", "Add"]
    _same_numerics(proto, model)


def test_a_reader_inside_a_subgraph_counts_as_its_if_node() -> None:
    body = """s = Add(x, r)
      z = If (c) <then_branch = t () => (float[2,4] o) { o = Neg(s) },
                  else_branch = e () => (float[2,4] p) { p = Abs(s) }>
      k = Relu(s)
      y = Mul(k, w)"""
    model = ir.from_onnx(_proto(body, "float[2,4] x, float[2,4] r, bool c", "float[2,4] y, float[2,4] z", W))
    assert _apply(model, RULE)[0] == 1
    assert _ops(model) == ["Sum", "Relu", "Mul", "If"]
    total = model.graph.nodes[0].outputs[0]
    assert {u.op_type for u, _ in total.uses()} == {"Relu", "Neg", "Abs"}


def test_no_place_for_the_replacement_is_a_near_miss_naming_the_value() -> None:
    # The weight is computed after a reader of the sum that precedes the root: no point is both
    # after the weight and before that reader.
    body = "s = Add(x, r)\n t = Tanh(s)\n w = Sigmoid(r)\n k = Relu(s)\n m = Mul(k, w)\n y = Add(m, t)"
    model = ir.from_onnx(_proto(body))
    n, ctx = _apply(model, RULE)
    assert n == 0 and "Sum" not in _ops(model)
    assert [d.message for d in ctx.diagnostics] == [
        "relu-sum: no place for the replacement: %w is defined after Tanh -> %t, which reads %s"]


def test_a_replaced_interior_model_output_keeps_its_name() -> None:
    proto = _proto("s = Add(x, r)\n k = Relu(s)\n y = Mul(k, w)", outputs="float[2,4] y, float[2,4] s", inits=W)
    model = ir.from_onnx(proto)
    assert _apply(model, RULE)[0] == 1
    assert [v.name for v in model.graph.outputs] == ["y", "s"]
    assert model.graph.outputs[1].producer().op_type == "Sum"
    _same_numerics(proto, model)


@pytest.mark.parametrize("stand_in", ["input", "constant"])
def test_an_interior_model_output_whose_replacement_cannot_take_its_name_is_declined(stand_in: str) -> None:
    # A graph input or a new initializer keeps its own name: the model interface would change.
    def fused(op, x, r, w):
        y = op.Mul(op.Relu(op.Sum(x, r)), w)
        return {"out": y, "sum": x if stand_in == "input" else op.const(np.zeros(4, np.float32))}

    rule = PatternRule("relu-sum", relu_sum, fused)
    model = ir.from_onnx(_proto("s = Add(x, r)\n k = Relu(s)\n y = Mul(k, w)", outputs="float[2,4] y, float[2,4] s",
                                inits=W))
    before = ir.print_model(model)
    n, ctx = _apply(model, rule)
    assert n == 0 and ir.print_model(model) == before
    assert any("%s is a graph output" in d.message and "cannot take its name" in d.message for d in ctx.diagnostics)


def test_a_failing_replacement_of_an_interior_value_leaves_the_graph_untouched() -> None:
    def broken(op, x, r, w, match):
        op.Sum(x, r)
        raise RuntimeError("half-way")

    rule = PatternRule("broken", relu_sum, broken)
    model = ir.from_onnx(_proto("s = Add(x, r)\n k = Relu(s)\n m = Mul(k, w)\n y = Add(m, s)", inits=W))
    before = ir.print_model(model)
    with pytest.raises(RuntimeError, match="half-way"):
        _apply(model, rule)
    assert ir.print_model(model) == before


def test_a_commit_failing_half_way_is_rolled_back() -> None:
    # The erase of the matched nodes fails after the new nodes are in and the sum's readers
    # rewired: all of it is undone.
    class FailingErase(Rewriter):
        def erase(self, nodes):
            raise RuntimeError("erase failed")

    model = ir.from_onnx(_proto("s = Add(x, r)\n k = Relu(s)\n m = Mul(k, w)\n t = Tanh(s)\n y = Add(m, t)",
                                outputs="float[2,4] y, float[2,4] s", inits=W))
    before = ir.print_model(model)
    rw = FailingErase()
    with pytest.raises(RuntimeError, match="erase failed"):
        apply_rules(model, [RULE], PassContext(target=X86), rw, pass_name="test")
    assert ir.print_model(model) == before and rw.changes == 0
    ir.verify(model)
    for value, uses in recompute_uses(model.graph).items():
        assert {(id(n), i) for n, i in value.uses()} == {(id(n), i) for n, i in uses}, value


def test_a_replacement_reading_a_matched_value_is_a_clear_error() -> None:
    # Matched values are erased or replaced: a new node may not read them.
    def reads_the_old_sum(op, x, r, w, match):
        s = match.node("sum").outputs[0]
        return {"out": op.Mul(op.Relu(op.Sum(s, r)), w), "sum": op.Sum(x, r)}

    model = ir.from_onnx(_proto("s = Add(x, r)\n k = Relu(s)\n m = Mul(k, w)\n y = Add(m, s)", inits=W))
    before = ir.print_model(model)
    with pytest.raises(TypeError, match="reads %s of Add"):
        _apply(model, PatternRule("reads-old", relu_sum, reads_the_old_sum))
    assert ir.print_model(model) == before


@pytest.mark.parametrize(("result", "message"), [
    (lambda y, s: {"sum": s}, "under 'out'"),
    (lambda y, s: {"out": y, "total": s}, "names no node of the pattern"),
    (lambda y, s: {"out": y, "root": s}, "is the root"),
    (lambda y, s: {"out": y, "sum": "s"}, "not by values of its outputs"),
])
def test_a_malformed_dict_is_a_clear_error(result, message: str) -> None:
    def pattern(op, x, r, w):
        return op.Mul(op.Relu(op.Add(x, r, _name="sum")), w, _name="root")

    def fused(op, x, r, w):
        s = op.Sum(x, r)
        return result(op.Mul(op.Relu(s), w), s)

    model = ir.from_onnx(_proto("s = Add(x, r)\n k = Relu(s)\n m = Mul(k, w)\n y = Add(m, s)", inits=W))
    with pytest.raises(TypeError, match=message):
        _apply(model, PatternRule("bad", pattern, fused))


def test_a_node_named_out_is_refused_at_construction() -> None:
    with pytest.raises(TypeError, match="'out' names the root's replacement"):
        PatternRule("bad", lambda op, x: op.Relu(op.Neg(x, _name="out")), lambda op, x: op.Abs(x))


def test_the_root_stays_refused_when_its_other_outputs_are_read() -> None:
    # A named root: its mean/inv-std outputs are interior values no replacement can replace.
    rule = PatternRule("ln", lambda op, x, g: op.LayerNormalization(x, g, _name="norm"),
                       lambda op, x, g: op.LayerNormalization(x, g, epsilon=1e-3))
    model = ir.from_onnx(_proto("y, mu = LayerNormalization(x, g)\n z = Neg(mu)", "float[2,4] x, float[4] g",
                                "float[2,4] y, float[2,1] z"))
    m = rule.prepare(model).match(model.graph.nodes[0])
    assert isinstance(m, NoMatch) and m.reason.startswith("%mu of LayerNormalization") and "read by Neg" in m.reason


def test_outputs_by_name_omit_optional_outputs_and_trailing_none_inputs_are_dropped() -> None:
    def pattern(op, x, skip, gamma):
        return op.SimplifiedLayerNormalization(op.Add(x, skip, _name="sum"), gamma)

    def fused(op, x, skip, gamma, match):
        y, mean, inv, s = op.SkipSimplifiedLayerNormalization(x, skip, gamma, None, _domain=_MS,
                                                              _outputs=["y", None, None, "sum"])
        assert mean is None and inv is None
        return {"out": y, "sum": s}

    body = "s = Add(x, r)\n n = SimplifiedLayerNormalization <epsilon = 1e-5> (s, g)\n y = Add(n, s)"
    proto = _proto(body, "float[2,3,4] x, float[2,3,4] r", "float[2,3,4] y", "<float[4] g = {1, 2, 3, 4}>")
    model = ir.from_onnx(proto)
    assert _apply(model, PatternRule("skip", pattern, fused))[0] == 1
    node = model.graph.nodes[0]
    assert node.op_type == "SkipSimplifiedLayerNormalization" and len(node.inputs) == 3
    assert node.outputs[1] is None and node.outputs[2] is None
    assert node.outputs[0].name.startswith("y") and node.outputs[3].name.startswith("sum")
    assert model.opset("com.microsoft") == 1
    _same_numerics(proto, model, atol=1e-4)  # the fused kernel sums in another order


def test_rule_cases_read_named_interior_values_outside_and_check_rule_holds() -> None:
    seen: collections.Counter[str] = collections.Counter()

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(rule_cases(RULE, values={"w": np.linspace(0.5, 2, 8)}))
    def run(case):
        outside = any("sum also read" in d for d in case.description)
        check_rule(RULE, case)
        seen["outside" if outside else "inside"] += 1
        if outside:  # the outside reader now reads the new Sum
            total = next(n for n in case.model.graph if n.op_type == "Sum").outputs[0]
            assert len(total.uses()) + total.is_graph_output() >= 2

    run()
    assert seen["outside"] >= 3 and seen["inside"] >= 3, seen


def test_a_rule_that_does_not_replace_a_named_value_is_refused_on_cases_that_read_it() -> None:
    # check_rule rejects those cases (the replacement's refusal is not a structural failure).
    rule = PatternRule("relu-sum", relu_sum, lambda op, x, r, w: op.Mul(op.Relu(op.Sum(x, r)), w))

    @settings(max_examples=20, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(rule_cases(rule, values={"w": np.linspace(0.5, 2, 8)}))
    def run(case):
        if any("also read" in d for d in case.description):
            m = rule.prepare(case.model).match(case.root, PassContext(target=X86))
            assert isinstance(m, NoMatch) and m.score == 1.0 and "does not replace" in m.reason
        check_rule(rule, case)

    run()


def test_returning_the_roots_own_value_keeps_the_root() -> None:
    # Only the named sum is replaced: the Mul stays (same node, same names), reading the new Sum.
    def pattern(op, x, r, w):
        return op.Mul(op.Add(x, r, _name="sum"), w)

    def keep(op, x, r, w, match):
        return {"out": match.root.outputs[0], "sum": op.Sum(x, r)}

    proto = _proto("s = Add(x, r)\n m = Mul(s, w)\n y = Add(m, s)", inits=W)
    model = ir.from_onnx(proto)
    mul = model.graph.nodes[1]
    assert _apply(model, PatternRule("keep", pattern, keep))[0] == 1
    assert _ops(model) == ["Sum", "Mul", "Add"] and model.graph.nodes[1] is mul and mul.outputs[0].name == "m"
    assert mul.inputs[0] is model.graph.nodes[0].outputs[0]
    _same_numerics(proto, model)


def test_a_kept_root_reading_an_erased_value_is_a_clear_error() -> None:
    def keep(op, x, r, w, match):
        return match.root.outputs[0]  # keeps the Mul, whose Relu input would be erased

    model = ir.from_onnx(_proto("s = Add(x, r)\n k = Relu(s)\n y = Mul(k, w)", inits=W))
    with pytest.raises(TypeError, match="the kept root reads %k of Relu"):
        _apply(model, PatternRule("keep", relu_sum, keep))


def test_a_root_whose_inputs_the_pattern_cannot_read_is_refused_at_once_and_quietly() -> None:
    # Mul(Tanh(..), w): no alternative reads a Tanh, so matching stops before it starts (not a near
    # miss); Mul(Relu(Sum(..)), w) fails deeper and is still explained.
    model = ir.from_onnx(_proto("s = Add(x, r)\n k = Tanh(s)\n y = Mul(k, w)", inits=W))
    m = RULE.prepare(model).match(model.graph.nodes[-1])
    assert isinstance(m, NoMatch) and not m.near
    model = ir.from_onnx(_proto("s = Sum(x, r)\n k = Relu(s)\n y = Mul(k, w)", inits=W))
    n, ctx = _apply(model, RULE)
    assert n == 0 and [d.message for d in ctx.diagnostics] == ["relu-sum: expected Add, got %s from Sum -> %s"]


def test_replaces_limits_which_named_values_may_be_read_elsewhere() -> None:
    """``replaces=()``: a named value read elsewhere refuses the match, and the replacement is not run
    while matching (a replacement that needs what ``rewrite`` prepares must not be called early)."""
    calls: list[bool] = []

    def needs_rewrite_state(op, x, r, w, match):
        calls.append(True)
        return relu_sum_fused(op, x, r, w, match)

    body = "s = Add(x, r)\n k = Relu(s)\n m = Mul(k, w)\n y = Add(m, s)"
    model = ir.from_onnx(_proto(body, inits=W))
    assert _apply(model, PatternRule("early", relu_sum, needs_rewrite_state, replaces=()))[0] == 0
    assert calls == []
    assert _apply(model, PatternRule("sum-only", relu_sum, needs_rewrite_state, replaces=("sum",)))[0] == 1
    assert calls  # declared: run while matching, then committed
    _same_numerics(_proto(body, inits=W), model)


def test_a_variable_bound_to_a_value_the_match_computes_is_refused_and_the_next_reading_taken() -> None:
    """``Add(Add(x, b), skip)`` over ``v = Add(x, b); Add(v, v)`` would bind ``skip`` to ``v``, which
    the rewrite erases (it raised in the replacement); the bias-free alternative matches instead."""
    rule = PatternRule("sum-of-two", lambda op, x, skip: op.Relu(
        op.Add(op.Add(x, op.const(name="b", ndim=1)), skip) | op.Add(x, skip)),
        lambda op, x, skip, b=None: op.Relu(op.Sum(x, *([] if b is None else [b]), skip)))
    proto = _proto("v = Add(x, b)\n s = Add(v, v)\n y = Relu(s)", inits="<float[4] b = {1, 2, 3, 4}>")
    model = ir.from_onnx(proto)
    fired, _ = _apply(model, rule)
    assert fired == 1
    assert _ops(model) == ["Add", "Sum", "Relu"]  # Sum(v, v): the inner Add kept
    _same_numerics(proto, model)


def test_residual_sum_norm_over_a_doubled_biased_value_fuses_without_error() -> None:
    """The case the pipeline property test found: LayerNorm(Add(v, v)) with v = Add(x, bias)."""
    from passes import PassManager

    proto = _proto("v = Add(x, b)\n s = Add(v, v)\n y = LayerNormalization <axis = -1> (s, g, b)",
                   inputs="float[2,4] x", inits="<float[4] b = {1, 2, 3, 4}, float[4] g = {1, 1, 2, 2}>")
    model = ir.from_onnx(proto)
    PassManager("fuse-layer-norm", verify=True, check_modified=True).run(model, PassContext(target=X86))
    assert "Sum" in _ops(model) and "Add" in _ops(model)
    _same_numerics(proto, model)
