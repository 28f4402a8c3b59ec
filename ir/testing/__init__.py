"""Helpers for testing code that uses the IR: hypothesis strategies for random well-formed models.

See :mod:`ir.testing.strategies`; its docstring shows how to property-test your own pass.
:mod:`ir.testing.rules` property-tests a pattern rule: models holding its pattern in random
forms (:func:`rule_cases`) and the checks that matter (:func:`check_rule`).
"""

from __future__ import annotations

from .rules import RuleCase, check_rule, rule_cases
from .strategies import Mutation, graphs, inputs_for, models, mutations, recompute_uses

__all__ = ["Mutation", "RuleCase", "check_rule", "graphs", "inputs_for", "models", "mutations", "recompute_uses",
           "rule_cases"]
