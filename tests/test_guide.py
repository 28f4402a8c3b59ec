"""docs/write-a-fusion.md: its four worked rules, and its property test, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "write-a-fusion.md").read_text()
BLOCKS = re.findall(r"<!-- guide-test -->\s*```python\n(.*?)```", GUIDE, flags=re.S)
WALKS = re.findall(r"<!-- walk-test -->\s*```python\n(.*?)```", GUIDE, flags=re.S)


def _run(code: str) -> None:
    # A fresh interpreter: each example registers its own pass, as a user's script would.
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_guide_has_four_worked_rules() -> None:
    assert len(BLOCKS) == 4


@pytest.mark.parametrize("index", range(4), ids=["silu", "gelu-with-bias", "check-on-shapes", "interior-value"])
def test_worked_rule_runs(index: int) -> None:
    _run(BLOCKS[index])


def test_silu_rule_is_at_most_20_lines() -> None:
    # The rule itself: the two functions, the PatternRule and its registration (imports and the
    # demonstration model excluded).
    code = BLOCKS[0].split("model = ")[0]
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.startswith(("import", "from"))]
    assert len(lines) <= 20, lines


def test_the_property_test_snippet_runs_on_the_silu_rule() -> None:
    snippet = re.search(r"## Test your rule.*?```python\n(.*?)```", GUIDE, flags=re.S)
    assert snippet is not None
    _run(BLOCKS[0] + "\n" + snippet.group(1) + "\ntest_my_rule()\n")


def test_the_interior_value_rule_passes_the_property_test_with_outside_readers() -> None:
    # rule_cases reads the named sum outside the match in some cases: the rule fires there too.
    _run(BLOCKS[3] + """
import collections
from hypothesis import HealthCheck, given, settings
from ir.testing import check_rule, rule_cases

seen = collections.Counter()

@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much])
@given(rule_cases(rule, values={"gamma": np.linspace(0.5, 2, 8)}))
def test_my_rule(case):
    check_rule(rule, case, atol=1e-4)
    seen[any("sum also read" in d for d in case.description)] += 1

test_my_rule()
assert seen[True] >= 3 and seen[False] >= 3, seen
""")


def test_the_loose_walk_example_runs() -> None:
    assert len(WALKS) == 1
    _run(WALKS[0])
