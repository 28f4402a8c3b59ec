"""docs/write-a-fusion.md: its three worked rules, and its property test, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "write-a-fusion.md").read_text()
BLOCKS = re.findall(r"<!-- guide-test -->\s*```python\n(.*?)```", GUIDE, flags=re.S)


def _run(code: str) -> None:
    # A fresh interpreter: each example registers its own pass, as a user's script would.
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_guide_has_three_worked_rules() -> None:
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("index", range(3), ids=["silu", "gelu-with-bias", "check-on-shapes"])
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
