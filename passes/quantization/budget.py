"""The accuracy budget of :mod:`passes.quantization.quantize` and its cross-validated margin.

:class:`Budget` is what a decision must hold (the worst and the mean calibration sample's cosine);
:func:`cross_validated_gap` measures how much better a decision scores on the samples it was made
on than on others (:class:`Gap`), and :meth:`Budget.tightened` raises the budget by it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .sensitivity import Score

__all__ = ["Budget", "Gap", "cross_validated_gap"]

#: what a fold's decision is: the forms chosen, or the forms with what scores them
Decision = TypeVar("Decision")


@dataclass(frozen=True)
class Budget:
    """The accuracy budget: the worst calibration sample's cosine, and the mean one (0: none)."""

    worst: float
    mean: float = 0.0

    def holds(self, s: Score) -> bool:
        """Whether ``s`` is within both bounds."""
        return s.worst >= self.worst and s.mean >= self.mean

    def slack(self, s: Score) -> float:
        """How far inside the budget ``s`` is (negative: outside), in units of each bound's room to 1."""
        out = (s.worst - self.worst) / max(1.0 - self.worst, 1e-9)
        if self.mean > 0:
            out = min(out, (s.mean - self.mean) / max(1.0 - self.mean, 1e-9))
        return out

    def tightened(self, gap: Gap) -> Budget:
        """The budget raised by a measured calibration-to-held-out ``gap`` (the mean bound only when
        there is one), kept below 1."""
        return Budget(min(self.worst + gap.worst, 1.0 - 1e-7),
                      min(self.mean + gap.mean, 1.0 - 1e-7) if self.mean > 0 else 0.0)

    def __str__(self) -> str:
        return f"min_cosine={self.worst:.6g}" + (f", min_mean_cosine={self.mean:.6g}" if self.mean > 0 else "")


@dataclass(frozen=True)
class Gap:
    """How much better a decision scores on the samples it was made on than on others.

    Attributes:
        worst: the mean (``reduce="max"``: the largest) over folds of (worst cosine inside - worst
            cosine outside), at least 0.
        mean: the same for the mean cosine, at least 0.
        folds: each fold's (worst, mean) difference, unclipped.
    """

    worst: float
    mean: float
    folds: tuple[tuple[float, float], ...] = ()

    def __str__(self) -> str:
        return f"worst {self.worst:.2e}, mean {self.mean:.2e}"


def cross_validated_gap(batches: list[int], decide: Callable[[list[int], Budget], Decision],
                        score: Callable[[Decision, list[int]], Score], budget: Budget, folds: int = 2,
                        reduce: str = "mean") -> Gap:
    """The optimism of deciding on calibration samples, by ``folds``-fold cross-validation.

    The batches are dealt into ``folds`` parts (``batches[k::folds]``); for each part, ``decide``
    chooses forms under ``budget`` on that part alone, and ``score`` measures them on the part and on
    the other batches. A search that adds ops while the budget holds on the samples it sees stops
    where those samples happen to allow, so its decision scores lower on samples it did not see; the
    mean difference over the folds estimates by how much, and tightening the budget by it makes the
    decision on all the calibration hold the budget on unseen data in expectation. A decision that
    does not depend on the samples (e.g. every op int8 on every fold) has a difference of zero on
    average over the folds: what remains is the selection's optimism, not sampling noise alone.

    The folds' differences are noisy (the worst of a few dozen samples is an extreme value: on
    MiniLM's 109 calibration sentences the two folds measured -4e-4 and +1.5e-3): ``reduce="max"``
    takes the largest fold's instead of the mean, a margin that holds on unseen samples more often
    at the price of fewer quantized ops.

    Args:
        batches: the batch indices to split.
        decide: ``decide(part, budget) -> decision``: the forms chosen (candidate index -> form), or
            anything ``score`` reads them from (e.g. with a model fitted on ``part``, as static
            activation scales are); a fold's decision is released before the next fold's is made.
        score: ``score(decision, part) -> Score`` over those batches.
        budget: the budget the decisions hold.
        folds: parts (at least 2).
        reduce: ``mean`` or ``max`` over the folds.
    """
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be mean or max, not {reduce!r}")
    if folds < 2 or len(batches) < folds:
        raise ValueError(f"cross-validation needs at least 2 folds of one batch each ({len(batches)} batches, {folds} folds)")
    parts = [batches[k::folds] for k in range(folds)]
    diffs = []
    for k, inside in enumerate(parts):
        outside = [b for j, p in enumerate(parts) if j != k for b in p]
        decision = decide(inside, budget)
        s_in, s_out = score(decision, inside), score(decision, outside)
        del decision  # it may hold a session of its own
        diffs.append((s_in.worst - s_out.worst, s_in.mean - s_out.mean))
    agg = np.mean if reduce == "mean" else np.max
    return Gap(max(0.0, float(agg([d[0] for d in diffs]))), max(0.0, float(agg([d[1] for d in diffs]))),
               tuple(diffs))
