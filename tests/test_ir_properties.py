"""Hypothesis properties of the IR over random well-formed models from :mod:`ir.testing`."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

import ir
from ir.testing import Mutation, inputs_for, models, mutations, recompute_uses

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_uses_exact(g: ir.Graph) -> None:
    expected = recompute_uses(g)
    values: dict[int, ir.Value] = {}
    for sub in g.all_graphs():
        for v in [*sub.inputs, *sub.initializers.values(), *sub.outputs]:
            values[id(v)] = v
        for n in sub:
            for v in [*n.inputs, *n.outputs]:
                if v is not None:
                    values[id(v)] = v
    for v in values.values():
        got = v.uses()
        want = expected.get(v, [])
        assert len(got) == len(set(got)), f"%{v.name} lists a use twice"
        assert set(got) == set(want), f"uses of %{v.name}: {got} != brute force {want}"


@SETTINGS
@given(models())
def test_generated_models_verify_and_pass_onnx_checker(model: ir.Model) -> None:
    ir.verify(model)
    assert len(model.graph) <= 30
    onnx.checker.check_model(ir.to_onnx(model), full_check=True)


@SETTINGS
@given(models(), st.integers(0, 2**32 - 1))
def test_onnx_ir_onnx_round_trip_preserves_numerics(model: ir.Model, seed: int) -> None:
    proto = ir.to_onnx(model)
    again = ir.to_onnx(ir.from_onnx(proto))
    feeds = inputs_for(model, np.random.default_rng(seed))
    for a, b in zip(run(proto, feeds), run(again, feeds), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@SETTINGS
@given(models())
def test_onnx_ir_onnx_round_trip_preserves_text_form(model: ir.Model) -> None:
    lowered = ir.from_onnx(ir.to_onnx(model))
    assert ir.print_model(lowered, full_tensors=True) == ir.print_model(model, full_tensors=True)
    assert ir.to_onnx(lowered).SerializeToString() == ir.to_onnx(model).SerializeToString()


@SETTINGS
@given(models(), st.integers(0, 2**32 - 1))
def test_text_form_round_trips_through_parser(model: ir.Model, seed: int) -> None:
    text = ir.print_model(model, full_tensors=True)
    parsed = ir.parse_model(text)
    assert ir.print_model(parsed, full_tensors=True) == text
    ir.verify(parsed)
    assert_uses_exact(parsed.graph)
    feeds = inputs_for(model, np.random.default_rng(seed))
    for a, b in zip(run(ir.to_onnx(model), feeds), run(ir.to_onnx(parsed), feeds), strict=True):
        np.testing.assert_array_equal(a, b)


@SETTINGS
@given(models(), mutations(max_size=12), st.integers(0, 2**32 - 1))
def test_random_mutations_keep_use_lists_exact(model: ir.Model, muts: list[Mutation], seed: int) -> None:
    g = model.graph
    for m in muts:
        m.apply(g)
        assert_uses_exact(g)
    ir.verify(model)
    # Mutations keep types, so the edited model still converts, checks and runs.
    proto = ir.to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    run(proto, inputs_for(model, np.random.default_rng(seed)))


@pytest.mark.parametrize(
    "kind", ["replace_input", "replace_all_uses_with", "insert_before", "insert_after", "erase_unused"]
)
def test_every_mutation_kind_applies_to_some_model(kind: str) -> None:
    # Guards the strategy itself: a mutation that never applies would make the property vacuous.
    picks = st.tuples(st.integers(0, 2**16), st.integers(0, 2**16), st.integers(0, 2**16))
    found = find(
        st.tuples(models(), picks),
        lambda mp: Mutation(kind, mp[1]).apply(mp[0].graph) is not None,
        settings=settings(max_examples=200, database=None, phases=[Phase.generate]),  # no need to shrink
    )
    assert found is not None
