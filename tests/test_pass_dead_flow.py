"""Tests of the dead-flow pass: golden graphs, subgraphs, functions, numerics and properties."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx.parser
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings

import ir
from ir.testing import inputs_for, models, recompute_uses
from passes import PassContext, PassManager, PassRecord
from passes.cleanup.dead_flow import DeadFlowPass

__all__: list[str] = []


from conftest import lower_text as lower, run_ir as run_ort  # noqa: E402


def run_pipeline(model: ir.Model, pipeline: str = "dead-flow") -> list[PassRecord]:
    # check_modified compares the printed IR with the flag each pass reports.
    return PassManager(pipeline, verify=True, check_modified=True).run(model, PassContext())


def check(model: ir.Model, feeds: dict[str, np.ndarray], *, modified: bool) -> None:
    """Run dead-flow, compare numerics with the original, and require a second run to be a no-op."""
    expected = run_ort(model, feeds)
    assert run_pipeline(model)[0].modified is modified
    for a, b in zip(expected, run_ort(model, feeds), strict=True):
        np.testing.assert_array_equal(a, b)
    assert run_pipeline(model)[0].modified is False
    assert_uses_exact(model)


def assert_uses_exact(model: ir.Model) -> None:
    """Use lists equal a brute-force recount (no reads left over from erased nodes)."""
    truth = recompute_uses(model.graph)
    for g in model.graph.all_graphs():
        values = list(g.inputs) + list(g.initializers.values())
        values += [o for n in g for o in n.outputs if o is not None]
        for v in values:
            assert sorted(map(_use_key, v.uses())) == sorted(map(_use_key, truth.get(v, []))), v


def _use_key(use: tuple[ir.Node, int]) -> tuple[int, int]:
    return id(use[0]), use[1]


def body(model: ir.Model) -> str:
    """The main graph's text form without its signature line and closing brace, dedented."""
    return textwrap.dedent("\n".join(ir.print_graph(model.graph).splitlines()[1:-1]))


FEEDS = {"x": np.array([1.0, -2.0], np.float32)}


def test_removes_dead_chain_and_unused_initializer() -> None:
    m = lower("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2] x, float[2] unused_input) => (float[2] y) <float[2] w = {1, 2}, float[2] u = {5, 6}> {
          a = Mul(x, w)
          dead1 = Add(a, u)
          dead2 = Relu(dead1)
          y = Neg(a)
        }
    """)
    check(m, {**FEEDS, "unused_input": FEEDS["x"]}, modified=True)
    assert body(m) == textwrap.dedent("""\
        init %w: float32[2] = float32[2] [1.0, 2.0]
        %a = Mul(%x, %w)
        %y: float32[2] = Neg(%a)""")
    assert [v.name for v in m.graph.inputs] == ["x", "unused_input"]  # inputs are interface


def test_nothing_to_do_reports_unmodified() -> None:
    m = lower("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y, float[2] w) <float[2] w = {1, 2}> {
          y = Mul(x, w)
        }
    """)
    before = ir.print_model(m)
    check(m, FEEDS, modified=False)
    assert ir.print_model(m) == before  # an initializer that is a graph output stays


def test_keeps_initializer_that_is_an_input_default() -> None:
    proto = onnx.parser.parse_model(textwrap.dedent("""
        <ir_version: 3, opset_import: ["" : 11]>
        g (float[2] x, float[2] d) => (float[2] y) <float[2] d = {1, 2}> {
          y = Neg(x)
        }
    """))
    m = ir.from_onnx(proto)
    assert run_pipeline(m)[0].modified is False
    assert "d" in m.graph.initializers


def test_multi_output_node_lives_while_one_output_is_read() -> None:
    m = lower("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[4] x) => (float[2] y) {
          a, b = Split<axis=0>(x)
          y = Neg(a)
        }
    """)
    check(m, {"x": np.arange(4, dtype=np.float32)}, modified=False)
    assert [n.op_type for n in m.graph] == ["Split", "Neg"]


IF_MODEL = """
    <ir_version: 10, opset_import: ["" : 17]>
    g (bool c, float[2] x) => (float[2] y) <float[2] w = {1, 2}> {
      a = Mul(x, w)
      b = Neg(x)
      d = Relu(x)
      y = If (c) <
        then_branch = g1 () => (float[2] t) <float[2] junk = {0, 0}> {
          dd = Sigmoid(d)
          t = Add(a, w)
        },
        else_branch = g2 () => (float[2] e) {
          e = Identity(b)
        }>
    }
"""


@pytest.mark.parametrize("cond", [True, False])
def test_subgraph_dead_nodes_and_the_outer_values_only_they_read(cond: bool) -> None:
    m = lower(IF_MODEL)
    check(m, {"c": np.array(cond), "x": FEEDS["x"]}, modified=True)
    # %d was read only by the dead Sigmoid inside the then branch: it goes in the same sweep.
    assert ir.print_graph(m.graph) == textwrap.dedent("""\
        graph "g" (%c: bool[], %x: float32[2]) -> (%y: float32[2]) {
          init %w: float32[2] = float32[2] [1.0, 2.0]
          %a = Mul(%x, %w)
          %b = Neg(%x)
          %y: float32[2] = If<then_branch=graph "g1" () -> (%t: float32[2]) {
            %t: float32[2] = Add(%a, %w)
          }, else_branch=graph "g2" () -> (%e: float32[2]) {
            %e: float32[2] = Identity(%b)
          }>(%c)
        }""")


def test_dead_if_takes_the_values_its_branches_capture() -> None:
    text = IF_MODEL.replace("=> (float[2] y)", "=> (float[2] z)")
    m = lower(text.replace("d = Relu(x)", "d = Relu(x)\n  z = Abs(x)"))
    check(m, {"c": np.array(True), "x": FEEDS["x"]}, modified=True)
    assert body(m) == "%z: float32[2] = Abs(%x)"


def test_loop_body_outputs_are_roots() -> None:
    m = lower("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) <int64 n = {3}, bool t = {1}> {
          junk = Relu(x)
          y = Loop (n, t, x) <body = b (int64 i, bool cin, float[2] acc) => (bool cout, float[2] next) {
            cout = Identity(cin)
            unused = Sigmoid(junk)
            also_unused = Mul(acc, acc)
            next = Add(acc, x)
          }>
        }
    """)
    check(m, FEEDS, modified=True)
    loop = next(iter(m.graph))
    assert loop.op_type == "Loop" and len(m.graph) == 1
    assert [n.op_type for n in loop.subgraphs()[0]] == ["Identity", "Add"]


def test_function_bodies_are_left_alone() -> None:
    m = lower("""
        <ir_version: 10, opset_import: ["" : 17, "local" : 1]>
        g (float[2] x) => (float[2] y) {
          dead = Relu(x)
          y, r = local.twice(x)
        }
        <domain: "local", opset_import: ["" : 17]>
        twice (a) => (b, unread) {
          scratch = Sigmoid(a)
          b = Add(a, a)
          unread = Neg(a)
        }
    """)
    check(m, FEEDS, modified=True)
    assert [n.op_type for n in m.graph] == ["twice"]
    assert [n.op_type for n in m.functions[0].graph] == ["Sigmoid", "Add", "Neg"]


def test_graph_output_produced_early_survives() -> None:
    m = lower("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] a, float[2] y) {
          a = Relu(x)
          b = Neg(a)
          y = Abs(x)
        }
    """)
    check(m, FEEDS, modified=True)
    assert [n.op_type for n in m.graph] == ["Relu", "Abs"]


def test_options_and_registration() -> None:
    m = lower("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) <float[2] u = {5, 6}> {
          y = Neg(x)
        }
    """)
    records = run_pipeline(m, "dead-flow{remove_initializers=false}")
    assert records[0].modified is False and "u" in m.graph.initializers
    assert DeadFlowPass().run(m, PassContext()).modified is True
    assert DeadFlowPass(remove_initializers=False).spec() == "dead-flow{remove_initializers=false}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_property_random_models(model: ir.Model) -> None:
    feeds = inputs_for(model, np.random.default_rng(0))
    expected = run_ort(model, feeds)
    run_pipeline(model)
    for a, b in zip(expected, run_ort(model, feeds), strict=True):
        # onnxruntime's own fusions may differ once the graph changes: a few ulps, not more.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert run_pipeline(model)[0].modified is False
    assert_uses_exact(model)
    # Every node left feeds an output: a node is live iff some output is read or is an output.
    for n in model.graph:
        assert any(o is not None and (o.has_uses() or o.is_graph_output()) for o in n.outputs)


def test_value_returned_directly_by_a_subgraph_is_live() -> None:
    # A branch returning an outer value uses it (IR semantics), so its producer stays.
    # (onnxruntime refuses such models, so there are no numerics; the verifier checks the scopes.)
    m = lower("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (bool c, float[2] x) => (float[2] y) <float[2] w = {1, 2}> {
          a = Relu(x)
          unread = Neg(x)
          y = If (c) <
            then_branch = g1 () => (float[2] a) { },
            else_branch = g2 () => (float[2] w) { }>
        }
    """)
    assert run_pipeline(m)[0].modified is True
    assert [n.op_type for n in m.graph] == ["Relu", "If"] and "w" in m.graph.initializers
    assert run_pipeline(m)[0].modified is False
