"""The search of the quantize passes: the largest set of ops in a form that still fits the budget.

The ops come ranked (least accuracy lost per multiply-add moved first, :func:`macs`); :func:`grow`
finds the longest prefix of that order that fits by bisection, then adds the ops after the one
that broke it, one trial each or, for big models, by a few more bisections
(:data:`LOCAL_ADDITION_ROUNDS`). ``fits`` is the caller's: a measurement of the combined model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._candidates import Candidate

__all__ = ["LOCAL_ADDITION_ROUNDS", "grow", "macs"]


def macs(c: Candidate) -> float:
    """Multiply-adds per token of a candidate's weight product."""
    return float(c.weight_shape[0] * c.weight_shape[1])


#: With ``ranking=local`` the search's additions after its first bisection are this many more
#: bisections, each over the ops after the one that broke the previous (skipped), instead of one
#: trial an op: unfiltered by a measurement alone, a 1B decoder's tail is ~100 ops a search.
LOCAL_ADDITION_ROUNDS = 3


def grow(start: dict[int, str], ok: list[Candidate], form: str, fits: Callable[[dict[int, str]], bool],
          bar: Callable[[int, str], Any], rounds: int | None = None) -> dict[int, str]:
    """``start`` with the most ops of ``ok`` (in the order to try them) in ``form`` that ``fits``: the
    longest fitting prefix by bisection, then additions: with ``rounds=None`` each op after the first
    that broke it tried in turn, else ``rounds`` more bisections over the ops after the one that
    broke the previous (each step advancing a progress ``bar`` made by the context's factory)."""

    def longest(forms: dict[int, str], pool: list[Candidate], b: Any) -> int:
        """The longest prefix of ``pool`` that fits on top of ``forms`` (by bisection)."""
        lo, hi = 0, len(pool)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits({**forms, **{c.index: form for c in pool[:mid]}}):
                lo = mid
            else:
                hi = mid - 1
            b.update()
        return lo

    with bar(max(1, len(ok)).bit_length(), f"quantize: {form} subsets tried (bisection)") as b:
        lo = longest(start, ok, b)
    forms = {**start, **{c.index: form for c in ok[:lo]}}
    tail = ok[lo + 1 :]
    if rounds is not None:
        with bar(rounds * max(1, len(tail)).bit_length(), f"quantize: {form} subsets tried (bisections after)") as b:
            for _ in range(rounds):
                if not tail:
                    break
                k = longest(forms, tail, b)
                forms.update({c.index: form for c in tail[:k]})
                tail = tail[k + 1 :]
        return forms
    with bar(len(tail), f"quantize: {form} subsets tried (additions)") as b:
        for c in tail:
            if fits({**forms, c.index: form}):
                forms[c.index] = form
            b.update()
    return forms
