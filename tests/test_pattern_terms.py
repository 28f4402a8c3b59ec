"""Pattern terms for loose walks: ``op.through`` (a repetition) and ``op.any_of`` (an op-type set).

Each is matched and refused, inside rules and alone (``CompiledPattern``, as the attention match uses
it); matching never mutates, backtracks, and explains a miss with a reason and a score.
"""

from __future__ import annotations

import numpy as np
import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ir
import targets
from conftest import ort_run
from passes import PassContext
from passes.framework._pattern_match import CompiledPattern, Failure
from passes.framework.match import scalar
from passes.framework.pattern import PatternRule
from passes.framework.rewriter import Rewriter
from passes.framework.rules import NoMatch, apply_rules

LAYOUT = {"Reshape", "Transpose", "Identity"}


def _lower(body: str, inputs: str = "float[2,4] x", outputs: str = "float[2,4] y") -> ir.Model:
    text = f"""<ir_version: 10, opset_import: ["" : 17]>
    g ({inputs}) => ({outputs}) {{
      {body}
    }}"""
    return ir.from_onnx(onnx.parser.parse_model(text))


def _out(model: ir.Model, name: str = "y") -> ir.Value:
    return next(v for v in model.graph.outputs if v.name == name)


def _node(model: ir.Model, out: str) -> ir.Node:
    return next(n for n in model.graph if any(o is not None and o.name == out for o in n.outputs))


def relu_through(op, x):
    return op.Relu(op.through(x, ops=LAYOUT, _name="layout"))


def test_through_matches_zero_nodes() -> None:
    model = _lower("y = Relu(x)")
    m = CompiledPattern(relu_through).match(_out(model))
    assert m and m.x is model.graph.inputs[0] and m.chain("layout") == []


def test_through_records_the_chain_from_the_use_back() -> None:
    model = _lower("""s = Constant <value = int64[2] {4, 2}> ()
      a = Reshape(x, s)   b = Transpose <perm = [1, 0]> (a)   c = Identity(b)   y = Relu(c)""")
    m = CompiledPattern(relu_through).match(_out(model))
    assert m and m.x is model.graph.inputs[0]
    assert [n.op_type for n in m.chain("layout")] == ["Identity", "Transpose", "Reshape"]
    assert {n.op_type for n in m.nodes} == {"Relu", "Identity", "Transpose", "Reshape"}


def test_through_stops_at_an_op_not_in_the_set() -> None:
    model = _lower("a = Neg(x)   b = Identity(a)   y = Relu(b)")
    m = CompiledPattern(relu_through).match(_out(model))
    assert m and m.x.name == "a" and [n.op_type for n in m.chain("layout")] == ["Identity"]


def test_through_backtracks_to_a_shorter_chain() -> None:
    # Greedy first (through both Transposes, where Transpose(x) finds no Transpose), then one shorter.
    def pat(op, x):
        return op.Relu(op.through(op.Transpose(x, _name="t"), ops=LAYOUT, _name="layout"))

    model = _lower("a = Transpose <perm = [1, 0]> (x)   b = Transpose <perm = [1, 0]> (a)   c = Identity(b)  y = Relu(c)")
    m = CompiledPattern(pat).match(_out(model))
    assert m and m.x.name == "x" and m.node("t") is _node(model, "a")
    assert [n.op_type for n in m.chain("layout")] == ["Identity", "Transpose"]


def test_follow_chooses_the_data_input_and_can_stop_the_walk() -> None:
    def data_input(node: ir.Node) -> ir.Value | None:
        if node.op_type == "Mul":  # a scale by a scalar, in either operand order
            a, b = node.inputs
            return a if scalar(b) is not None else b if scalar(a) is not None else None
        return node.inputs[0]

    def pat(op, x):
        return op.Relu(op.through(x, ops=LAYOUT | {"Mul"}, follow=data_input, _name="walk"))

    model = _lower("""k = Constant <value = float {2.0}> ()
      a = Mul(x, x)   b = Mul(k, a)   c = Identity(b)   y = Relu(c)""")
    m = CompiledPattern(pat).match(_out(model))
    assert m and m.x.name == "a"  # Mul(x, x) is not a scale: the walk stops there
    assert [n.op_type for n in m.chain("walk")] == ["Identity", "Mul"]


def test_min_and_max_bound_the_chain_and_a_miss_is_explained() -> None:
    def at_least_two(op, x):
        return op.Relu(op.through(x, ops=LAYOUT, min=2))

    def at_most_one(op, x):
        return op.Relu(op.through(x, ops=LAYOUT, max=1))

    model = _lower("a = Identity(x)   y = Relu(a)")
    miss = CompiledPattern(at_least_two).match(_out(model))
    assert isinstance(miss, Failure) and not miss and "at least 2" in miss.reason and 0 < miss.score < 1
    deeper = _lower("a = Identity(x)   b = Identity(a)   y = Relu(b)")
    m = CompiledPattern(at_most_one).match(_out(deeper))
    assert m and m.x.name == "a"


def test_a_named_chain_of_an_alternative_not_taken_reads_none() -> None:
    def pat(op, x):
        return op.Relu(op.Neg(op.through(x, ops=LAYOUT, _name="inner")) | x)

    m = CompiledPattern(pat).match(_out(_lower("y = Relu(x)")))
    assert m and m.chain("inner") is None


def test_any_of_matches_each_type_commutes_and_leaves_extra_inputs_free() -> None:
    def pat(op, x):
        return op.Relu(op.any_of({"Add", "Where"}, x, _name="mix"))

    def both(op, x):
        return op.Relu(op.any_of({"Add", "Mul"}, x, op.const(name="k")))

    compiled = CompiledPattern(pat)
    add = _lower("k = Constant <value = float {1.0}> ()   a = Add(k, x)   y = Relu(a)")
    m = CompiledPattern(both).match(_out(add))
    assert m and m.x is add.graph.inputs[0] and m.k.name == "k"  # Add commutes: both orders are tried
    m = compiled.match(_out(add))
    assert m and m.node("mix").op_type == "Add" and m.x.name == "k"  # one input given: a prefix
    where = _lower("""c = Constant <value = bool {1}> ()   k = Constant <value = float {0.0}> ()
      a = Where(c, x, k)   y = Relu(a)""")
    m = compiled.match(_out(where))
    assert m and m.node("mix").op_type == "Where" and m.x.name == "c"  # the first input, the rest free
    miss = compiled.match(_out(_lower("a = Neg(x)   y = Relu(a)")))
    assert not miss and "one of Add/Where" in miss.reason


def test_any_of_and_through_in_a_rule_fire_and_preserve_numerics() -> None:
    # Relu(layout*(Add|Sub(h, c))) -> layout chain dropped is not an identity, so replace by the same
    # ops in a shorter spelling: here Relu(Identity*(Add(h, c))) -> Relu(Add(h, c)).
    def pat(op, h):
        return op.Relu(op.through(op.any_of({"Add", "Sub"}, h, op.const(name="c"), _name="bin"), ops={"Identity"}, min=1))

    def repl(op, h, c, match):
        return op.Relu(getattr(op, match.node("bin").op_type)(h, c))

    rule = PatternRule("drop-identities", pat, repl)
    text = """<ir_version: 10, opset_import: ["" : 17]>
    g (float[2,4] x) => (float[2,4] y) { k = Constant <value = float {0.5}> ()
      a = Sub(x, k)   b = Identity(a)   c = Identity(b)   y = Relu(c) }"""
    proto = onnx.parser.parse_model(text)
    model = ir.from_onnx(proto)
    assert rule.roots == ("Relu",)
    n = apply_rules(model, [rule], PassContext(target=targets.get("x86")), Rewriter(), pass_name="test")
    ir.verify(model)
    assert n == 1 and [x.op_type for x in model.graph if x.op_type != "Constant"] == ["Sub", "Relu"]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(ir.to_onnx(model), feeds)["y"], ort_run(proto, feeds)["y"])


def test_a_through_node_read_outside_a_rule_is_refused_with_its_reason() -> None:
    rule = PatternRule("relu-through", relu_through, lambda op, x: op.Relu(x))
    model = _lower("a = Identity(x)   y = Relu(a)   z = Neg(a)", outputs="float[2,4] y, float[2,4] z")
    before = str(model.graph)
    got = rule.match(_node(model, "y"), PassContext())
    # The chain is greedy, so it takes the Identity; a shorter chain binds x to %a instead.
    assert not isinstance(got, NoMatch) and got.x.name == "a"
    assert str(model.graph) == before  # matching never mutates


def test_any_of_root_dispatches_on_every_type() -> None:
    rule = PatternRule("neg-or-abs", lambda op, x: op.any_of({"Neg", "Abs"}, x), lambda op, x: op.Neg(x))
    assert rule.roots == ("Abs", "Neg")


def test_failure_score_grows_with_how_far_the_match_came() -> None:
    def pat(op, x):
        return op.Relu(op.through(op.Sigmoid(op.Neg(op.Exp(x))), ops=LAYOUT))

    compiled = CompiledPattern(pat)
    near = compiled.match(_out(_lower("a = Abs(x)  b = Neg(a)  c = Sigmoid(b)  d = Identity(c)  y = Relu(d)")))
    far = compiled.match(_out(_lower("c = Sigmoid(x)   y = Relu(c)")))
    assert not near and not far and near.score > far.score
    assert "expected Exp" in near.reason


def _computed(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.producer() is not None and v.producer().op_type != "Constant"]


TREE = """k = Constant <value = float {2.0}> ()
      m1 = MatMul(x, w)   m2 = MatMul(x, w)   s = Mul(m2, k)   a = Add(s, m1)   y = Relu(a)"""


def test_lazy_through_searches_a_tree_of_ops_nearest_first() -> None:
    # follow returns several inputs: a search; lazy: breadth-first, so the MatMul next to the Add
    # comes before the one behind the Mul, whatever their operand order.
    def pat(op, p, q):
        return op.Relu(op.through(op.MatMul(p, q, _name="mm"), ops={"Add", "Mul"}, follow=_computed, lazy=True,
                                  _name="ops"))

    model = _lower(TREE, inputs="float[2,4] x, float[4,4] w")
    found = [(m.node("mm").outputs[0].name, [n.op_type for n in m.chain("ops")])
             for m in CompiledPattern(pat).matches(_out(model))]
    assert found == [("m1", ["Add"]), ("m2", ["Add", "Mul"])]


def test_greedy_through_with_branches_goes_deepest_first_and_a_miss_is_reported() -> None:
    def pat(op, z):
        return op.Relu(op.through(z, ops={"Add", "Mul"}, follow=_computed, _name="ops"))

    model = _lower(TREE, inputs="float[2,4] x, float[4,4] w")
    ends = [m.z.name for m in CompiledPattern(pat).matches(_out(model))]
    assert ends == ["m2", "s", "m1", "a"]  # along Add's first input to the end, then back, then the other
    failure: list[Failure] = []
    got = list(CompiledPattern(lambda op, p: op.Relu(op.through(op.Neg(p), ops={"Add", "Mul"}, follow=_computed)))
               .matches(_out(model), failure=failure))
    assert got == [] and "expected Neg" in failure[0].reason


@settings(max_examples=40, deadline=None)
@given(chain=st.lists(st.sampled_from(["Identity", "Transpose", "Reshape", "Neg"]), max_size=6),
       limit=st.one_of(st.none(), st.integers(0, 4)))
def test_property_through_takes_the_longest_run_of_its_ops(chain: list[str], limit: int | None) -> None:
    """Random chains: the match takes exactly the run of layout ops next to the use, up to ``max``."""
    lines, prev = ['s = Constant <value = int64[2] {2, 4}> ()'], "x"
    for i, op in enumerate(chain):
        args = f"{prev}, s" if op == "Reshape" else prev
        attrs = " <perm = [0, 1]>" if op == "Transpose" else ""
        lines.append(f"v{i} = {op}{attrs}({args})")
        prev = f"v{i}"
    lines.append(f"y = Relu({prev})")
    model = _lower("\n".join(lines))

    def pat(op, x):
        return op.Relu(op.through(x, ops=LAYOUT, max=limit, _name="layout"))

    before = str(model.graph)
    m = CompiledPattern(pat).match(_out(model))
    run = 0
    for op in reversed(chain):
        if op == "Neg" or (limit is not None and run == limit):
            break
        run += 1
    assert m and [n.op_type for n in m.chain("layout")] == list(reversed(chain))[:run]
    assert m.x.name == ("x" if run == len(chain) else f"v{len(chain) - run - 1}")
    assert str(model.graph) == before


@pytest.mark.parametrize("bad", [set(), ""])
def test_empty_op_sets_are_refused_at_construction(bad) -> None:
    with pytest.raises(ValueError):
        CompiledPattern(lambda op, x: op.Relu(op.through(x, ops=bad)))
    with pytest.raises(ValueError):
        CompiledPattern(lambda op, x: op.any_of(bad, x))


PATH_MODEL = """<ir_version: 10, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[1,3,8] x, int64[1,3] pos, float[8,2] cos, float[8,2] sin, float[1,2,5,4] past) => (float[1,4,8,4] y)
      <float[8,8] w = {""" + ", ".join(["0.5"] * 64) + """}, float[4] nw = {1, 1, 1, 1}, int64[4] hs = {0, 0, 2, 4}, int64[5] es = {1, 2, 2, 8, 4}, int64[4] rs = {1, 4, 8, 4},
       int64[1] ax = {2}> {
      p = MatMul(x, w)   h = Reshape(p, hs)   n = SimplifiedLayerNormalization <axis = -1> (h, nw)
      t = Transpose <perm = [0, 2, 1, 3]> (n)   r = com.microsoft.RotaryEmbedding <interleaved = 0> (t, pos, cos, sin)
      c = Concat <axis = 2> (past, r)   u = Unsqueeze(c, ax)   e = Expand(u, es)   y = Reshape(e, rs) }"""


def test_attention_operand_path_is_a_pattern_of_optional_steps_in_order() -> None:
    from passes.fusions._attention_pattern import operand_path, path_nodes, projection

    model = ir.from_onnx(onnx.parser.parse_model(PATH_MODEL))
    before = str(model.graph)
    m = operand_path(_out(model))
    assert [m.node(k).op_type for k in ("repeat", "concat", "rotary", "norm")] == [
        "Expand", "Concat", "RotaryEmbedding", "SimplifiedLayerNormalization"]
    assert m.src.name == "p" and m.past.name == "past"
    assert [n.op_type for n in path_nodes(m)] == ["Reshape", "Expand", "Unsqueeze", "Concat", "RotaryEmbedding",
                                                  "Transpose", "SimplifiedLayerNormalization", "Reshape"]
    proj = projection(m.src)
    assert not isinstance(proj, str) and proj.x.name == "x" and proj.weight.name == "w" and proj.bias is None
    assert str(model.graph) == before


def test_attention_operand_path_stops_at_a_step_out_of_order() -> None:
    from passes.fusions._attention_pattern import operand_path, projection

    # A head repeat below the rotary is not a GQA repeat of the cache: the walk ends there, and the
    # projection says what it found instead.
    text = PATH_MODEL.replace("r = com.microsoft.RotaryEmbedding <interleaved = 0> (t, pos, cos, sin)",
                              "t2 = Expand(t, es)   r = com.microsoft.RotaryEmbedding <interleaved = 0> (t2, pos, cos, sin)")
    model = ir.from_onnx(onnx.parser.parse_model(text))
    m = operand_path(_out(model))
    assert m.node("rotary") is not None and m.node("norm") is None and m.src.name == "t2"
    why = projection(m.src)
    assert isinstance(why, str) and "comes from Expand" in why and "not from a MatMul projection" in why
