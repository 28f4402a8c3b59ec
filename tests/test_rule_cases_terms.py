"""``ir.testing.rule_cases`` builds ``op.through`` chains and ``op.any_of`` nodes, and ``check_rule`` judges them.

Exact rules over those terms hold on every generated case; a rule that is wrong for one of the
chain's op types or one of the ``any_of`` types is caught — the generator really produces them.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings

from ir.testing import check_rule, rule_cases
from passes import PatternRule

# |through(Identity/Neg)(x)|: Neg and Identity change no absolute value, so the chain goes (at least
# one node: with none the rule would match its own output).
ABS_THROUGH = PatternRule(
    "abs-through-sign", lambda op, x: op.Abs(op.through(x, {"Identity", "Neg"}, min=1, _name="chain")),
    lambda op, x: op.Abs(x))
# Abs(Abs|Neg(x)) is Abs(x) whichever type the inner node has.
ABS_ANY = PatternRule(
    "abs-of-abs-or-neg", lambda op, x: op.Abs(op.any_of({"Abs", "Neg"}, x)), lambda op, x: op.Abs(x))
# Wrong when the chain holds a Relu: Neg(Relu(x)) is not Neg(x).
WRONG_THROUGH = PatternRule(
    "neg-through-relu", lambda op, x: op.Neg(op.through(x, {"Identity", "Relu"}, min=1)), lambda op, x: op.Neg(x))
# Right for Abs (Relu(|x|) is |x|), wrong when the any_of node is a Neg: Relu(-x) is not |x|.
WRONG_ANY = PatternRule(
    "relu-of-abs-or-neg", lambda op, x: op.Relu(op.any_of({"Abs", "Neg"}, x)), lambda op, x: op.Abs(x))

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("rule", [ABS_THROUGH, ABS_ANY], ids=lambda r: r.name)
def test_exact_rules_over_through_and_any_of_hold_on_generated_cases(rule: PatternRule) -> None:
    @SETTINGS
    @given(rule_cases(rule))
    def prop(case):  # type: ignore[no-untyped-def]
        check_rule(rule, case)

    prop()


def test_generated_chains_vary_in_length_and_any_of_in_type() -> None:
    seen_chains, seen_types = set(), set()

    @settings(max_examples=40, deadline=None, database=None)
    @given(rule_cases(ABS_THROUGH), rule_cases(ABS_ANY))
    def collect(a, b):  # type: ignore[no-untyped-def]
        seen_chains.update(n for n in a.description if n.startswith("through"))
        seen_types.update(n for n in b.description if n.startswith("any_of"))

    collect()
    lengths = {n.count(",") + (0 if n.endswith("[]") else 1) for n in seen_chains}
    assert {1, 2, 3} <= lengths, seen_chains
    assert seen_types == {"any_of as Abs", "any_of as Neg"}


@pytest.mark.parametrize("rule", [WRONG_THROUGH, WRONG_ANY], ids=lambda r: r.name)
def test_a_wrong_rule_over_through_or_any_of_is_caught(rule: PatternRule) -> None:
    def fails(case) -> bool:  # type: ignore[no-untyped-def]
        try:
            check_rule(rule, case)
        except AssertionError:
            return True
        except Exception:  # hypothesis' assume() rejections and the like
            return False
        return False

    # No shrinking: the first failing case found is enough, and shrinking models is slow.
    bad = find(rule_cases(rule), fails, settings=settings(max_examples=60, deadline=None, database=None,
                                                         phases=[Phase.generate]))
    assert any(("Relu" in n or "Neg" in n) for n in bad.description), bad.description


def test_through_with_min_and_no_generatable_op_types_says_how() -> None:
    rule = PatternRule("reshape-chain", lambda op, x: op.Abs(op.through(x, {"Reshape"}, min=1)),
                       lambda op, x: op.Abs(x))
    with pytest.raises(ValueError, match="attrs="):
        find(rule_cases(rule), lambda c: True, settings=settings(max_examples=5, database=None))
