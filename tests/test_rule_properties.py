"""Every built-in pattern rule, property-tested with ir.testing's rule strategies: it fires on any
spelling of its pattern, keeps numerics in onnxruntime, and a second run changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from ir.testing import check_rule, rule_cases
from passes.fusions.activations import ACTIVATION_RULES
from passes.fusions.gelu import GELU_RULES
from passes.cleanup.simplify import NO_OP_RULES
from passes.fusions.layer_norm import NORM_RULES

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
RULES = {r.name: r for r in (*GELU_RULES, *ACTIVATION_RULES, *NORM_RULES, *NO_OP_RULES)}
# What a random instance cannot choose well: the axes of the norms' means, the unit weight a γ
# folds into, the opset that has a standard Gelu.
OPTIONS = {
    "layer-norm": {"attrs": {"ReduceMean": {"axes": [-1]}}},
    "rms-norm": {"attrs": {"ReduceMean": {"axes": [-1]}}},
    "norm-gamma": {"values": {"g": np.ones(8, np.float32), "gamma": np.linspace(0.5, 2, 8)}},
    "norm-beta": {"values": {"gamma": np.linspace(0.5, 2, 8), "beta": np.linspace(-1, 1, 8)}},
    "gelu-standard": {"opset": 20},
    "dropout": {"values": {"ratio": np.float32(0.5), "mode": np.bool_(False)}},
    "no-op-cast": {"attrs": {"Cast": {"to": 1}}},
    "no-op-reshape": {"values": {"shape": np.array([2, 3, 8], np.int64)}},
    "no-op-expand": {"values": {"shape": np.array([3, 1], np.int64)}},
    "no-op-transpose": {"attrs": {"Transpose": {"perm": [0, 1, 2]}}},
    "neutral-element": {"values": {"c": np.float32(0.0)}},
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_properties(name: str) -> None:
    rule = RULES[name]

    @SETTINGS
    @given(rule_cases(rule, **OPTIONS.get(name, {})))
    def run(case):
        check_rule(rule, case)

    run()
