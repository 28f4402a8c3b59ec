"""A rule's rewrite is all-or-nothing: a rewrite that raises half-way leaves the graph as it was."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx.parser
import pytest

import ir
from ir.testing import recompute_uses
from passes import NoMatch, PassContext, Rule
from passes.framework.rewriter import Rewriter
from passes.framework.rules import apply_rules


def _model() -> ir.Model:
    return ir.from_onnx(onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 17]>
    g (float[2,4] x) => (float[2,4] y) <float[4] w = {1, 2, 3, 4}> {
      a = Add(x, w)  b = Relu(a)  c = Mul(b, a)  y = Tanh(c) }"""))


class HalfWayRule(Rule):
    """Makes nodes, rewires, erases, sets attributes and constants, then fails."""

    name = "half-way"
    roots = ("Mul",)

    def check(self, node: ir.Node, ctx: PassContext) -> Any:
        return node

    def rewrite(self, node: ir.Node, rw: Rewriter, ctx: PassContext) -> None:
        g = node.graph
        assert g is not None
        relu = node.inputs[0].producer()
        k = rw.constant(g, np.float32(2.0), name="k")
        new = rw.make("Mul", [node.inputs[1], k], before=node)
        rw.replace_all_uses_with(node.outputs[0], new.outputs[0])
        rw.erase([node, relu])
        rw.set_attr(new, "note", 1)
        rw.set_type(new.outputs[0], ir.TensorType(ir.DataType.FLOAT, (2, 4)))
        tanh = next(n for n in g if n.op_type == "Tanh")
        rw.replace_input(tanh, 0, node.inputs[1])
        raise RuntimeError("the rewrite failed half-way")


def test_a_failing_rewrite_is_rolled_back() -> None:
    model = _model()
    before = ir.print_model(model)
    rw = Rewriter()
    with pytest.raises(RuntimeError, match="half-way"):
        apply_rules(model, [HalfWayRule()], PassContext(), rw, pass_name="test")
    assert ir.print_model(model) == before
    ir.verify(model)
    for value, uses in recompute_uses(model.graph).items():
        assert {(id(n), i) for n, i in value.uses()} == {(id(n), i) for n, i in uses}, value
    assert rw.changes == 0 and not rw.stats


def test_a_rewrite_that_raises_at_the_output_is_rolled_back_with_names() -> None:
    class RenameThenFail(HalfWayRule):
        roots = ("Tanh",)

        def rewrite(self, node: ir.Node, rw: Rewriter, ctx: PassContext) -> None:
            new = rw.make("Sigmoid", [node.inputs[0]], before=node)
            rw.replace_all_uses_with(node.outputs[0], new.outputs[0])  # a model output: names move
            rw.erase(node)
            raise RuntimeError("after the output moved")

    model = _model()
    before = ir.print_model(model)
    with pytest.raises(RuntimeError):
        apply_rules(model, [RenameThenFail()], PassContext(), Rewriter(), pass_name="test")
    assert ir.print_model(model) == before
    assert model.graph.outputs[0].name == "y" and model.graph.outputs[0].producer().op_type == "Tanh"
    ir.verify(model)


def test_a_successful_rewrite_keeps_its_changes() -> None:
    class Ok(HalfWayRule):
        roots = ("Relu",)

        def check(self, node: ir.Node, ctx: PassContext) -> Any:
            return node if node.op_type == "Relu" else NoMatch("no")

        def rewrite(self, node: ir.Node, rw: Rewriter, ctx: PassContext) -> None:
            new = rw.make("Abs", [node.inputs[0]], before=node)
            rw.replace_all_uses_with(node.outputs[0], new.outputs[0])
            rw.erase(node)

    model = _model()
    assert apply_rules(model, [Ok()], PassContext(), Rewriter(), pass_name="test") == 1
    assert [n.op_type for n in model.graph] == ["Add", "Abs", "Mul", "Tanh"]


def test_moving_a_node_and_its_weight_into_an_if_branch_is_undone_as_a_whole() -> None:
    """``move_into``, ``move_initializer``, ``set_outputs`` (the quantize switch model's If branches): the moved node
    keeps its inputs, now captures of the branch, and a failing rewrite puts node and weight back."""
    model = _model()
    before = ir.print_model(model)
    g = model.graph
    add = next(n for n in g if n.op_type == "Add")
    w = add.inputs[1]
    rw = Rewriter()
    with pytest.raises(RuntimeError, match="after the move"):
        with rw.transaction():
            flag = g.add_input(ir.Value("flag", ir.TensorType(ir.DataType.BOOL, ())))
            then_g, else_g = ir.Graph(name="then"), ir.Graph(name="else")
            sel = rw.make("If", [flag], {"then_branch": then_g, "else_branch": else_g}, before=add,
                          types=[add.outputs[0].type])
            rw.set_outputs(then_g, [rw.make("Neg", [add.inputs[0]], graph=then_g).outputs[0]])
            rw.replace_all_uses_with(add.outputs[0], sel.outputs[0])
            rw.move_into(add, else_g)
            rw.move_initializer(w, else_g)
            rw.set_outputs(else_g, [add.outputs[0]])
            assert add.graph is else_g and w.graph is else_g and "w" not in g.initializers
            assert else_g.captured_values() == [add.inputs[0]]
            ir.verify(model)
            raise RuntimeError("after the move")
    del g.inputs[-1]
    assert ir.print_model(model) == before
    ir.verify(model)
    for value, uses in recompute_uses(model.graph).items():
        assert {(id(n), i) for n, i in value.uses()} == {(id(n), i) for n, i in uses}, value


def test_take_initializer_refuses_interface_values() -> None:
    model = _model()
    g = model.graph
    sub = ir.Graph(name="sub")
    with pytest.raises(ir.IRError, match="not an initializer"):
        sub.take_initializer(g.inputs[0])
    w = g.initializers["w"]
    assert sub.take_initializer(w) is w and w.graph is sub and sub.initializers["w"] is w
    assert g.take_initializer(w) is w and g.initializers["w"] is w
