"""Every built-in pattern rule, property-tested with ir.testing's rule strategies: it fires on any
spelling of its pattern, keeps numerics in onnxruntime, and a second run changes nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import targets
from ir.testing import check_rule, rule_cases
from passes.fusions.activations import ACTIVATION_RULES
from passes.fusions.gelu import GELU_RULES
from passes.cleanup.simplify import NO_OP_RULES
from passes.fusions.layer_norm import NORM_RULES, RESIDUAL_RULES

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
RULES = {r.name: r for r in (*GELU_RULES, *ACTIVATION_RULES, *NORM_RULES, *RESIDUAL_RULES, *NO_OP_RULES)}
_NORM_PARAMS = {"gamma": np.linspace(0.5, 2, 8), "beta": np.linspace(-1, 1, 8)}
# What a random instance cannot choose well: the axes of the norms' means, the unit weight a γ
# folds into, the opset that has a standard Gelu, per-channel γ/β of the residual norms (and an
# opset that has RMSNormalization), a no-op Cast.
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
    "skip-layer-norm": {"values": _NORM_PARAMS, "attrs": {"Cast": {"to": 1}}, "opset": 23},
    "residual-sum-norm": {"values": _NORM_PARAMS, "attrs": {"Cast": {"to": 1}}},
}
#: The target a rule is checked for, when not x86 (x86 folds a LayerNorm's residual into a Sum).
TARGETS = {"skip-layer-norm": dataclasses.replace(targets.get("x86"), residual_layer_norm="skip")}


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_properties(name: str) -> None:
    rule = RULES[name]

    @SETTINGS
    @given(rule_cases(rule, **OPTIONS.get(name, {})))
    def run(case):
        check_rule(rule, case, target=TARGETS.get(name, "x86"))

    run()


def _code_lines(fn, module, seen: set[int]) -> int:
    """Lines of ``fn`` without blanks, comments and docstrings, plus the same-module helpers it calls."""
    import ast
    import inspect
    import textwrap

    if fn is None or id(fn) in seen:
        return 0
    seen.add(id(fn))
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    doc = {n.value.lineno for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
           and isinstance(n.value.value, str)}
    lines = textwrap.dedent(inspect.getsource(fn)).splitlines()
    n = sum(1 for i, ln in enumerate(lines, 1) if ln.strip() and not ln.strip().startswith("#") and i not in doc)
    for node in ast.walk(tree):
        helper = vars(module).get(node.id) if isinstance(node, ast.Name) else None
        if inspect.isfunction(helper) and helper.__module__ == module.__name__:
            n += _code_lines(helper, module, seen)
    return n


@pytest.mark.parametrize("name", sorted(set(RULES) - {r.name for r in NO_OP_RULES}))
def test_fusion_rules_read_in_one_screen(name: str) -> None:
    # Pattern, replacement and check with the module's own helpers they call: at most 40 lines.
    import sys

    rule = RULES[name]
    module = sys.modules[rule.replacement.__module__]
    seen: set[int] = set()
    assert sum(_code_lines(f, module, seen) for f in (*rule.patterns, rule.replacement, rule.check_fn)) <= 40
