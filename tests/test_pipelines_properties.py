"""Every built-in target pipeline over random well-formed graphs: numerics, verifier, idempotence."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings

import ir
import targets
from ir.testing import inputs_for, models
from passes import PassContext, PassManager


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(ir.to_onnx(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("target_name", sorted(targets.all_targets()))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=models())
def test_target_pipeline_keeps_numerics_and_is_idempotent(target_name: str, model: ir.Model) -> None:
    target = targets.get(target_name)
    feeds = inputs_for(model, np.random.default_rng(0))
    expected = _run(model, feeds)
    ctx = PassContext(target=target)
    PassManager(target.pipeline, verify=True, check_modified=True).run(model, ctx)
    ir.verify(model)
    for a, b in zip(expected, _run(model, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    again = PassManager(target.pipeline, verify=True, check_modified=True).run(model, PassContext(target=target))
    assert not any(r.modified for r in again), [r.spec for r in again if r.modified]
