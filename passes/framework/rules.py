"""Pattern rules and the one greedy worklist driver that applies them.

A fusion is a :class:`Rule`: the op types its root node may have, a ``check`` that returns a match
object or a :class:`NoMatch` with the reason, and a ``rewrite``. ``check`` never mutates the IR.
Alternatives (erf vs tanh GELU, ``Pow(x,2)`` vs ``Mul(x,x)``, exporter variants) are branches of
one rule's ``check``, not copies of the rule.

:func:`apply_rules` runs rule sets to a fixed point with a step cap (an error, not a hang), and
reports near misses (a root that looked right but failed a later check) as diagnostics.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import ir

from .base import Pass, PassContext, PassError, PassResult
from .rewriter import Rewriter

__all__ = ["Rule", "NoMatch", "RulesPass", "apply_rules"]


@dataclass(frozen=True)
class NoMatch:
    """Why a rule did not match. ``near`` marks a near miss worth telling the user about.

    ``score`` says how near (the fraction of the pattern that matched; 1.0 when only a check
    refused): when several rules nearly match at one node, ``--explain`` keeps the nearest.
    """

    reason: str
    near: bool = False
    score: float = 1.0

    def __bool__(self) -> bool:
        return False


class Rule:
    """A rewrite rule anchored at a root node.

    Subclasses set ``name``, ``roots`` (op types the root may have; ``root_domain`` for non-ONNX
    ops), and implement :meth:`check` and :meth:`rewrite`.
    """

    name: ClassVar[str] = ""
    roots: ClassVar[tuple[str, ...]] = ()
    root_domain: ClassVar[str] = ""
    #: Counter name in the compile report, e.g. ``"fused Gelu"``.
    stat: ClassVar[str] = ""

    def check(self, node: ir.Node, ctx: PassContext) -> Any:
        """Return a match object (truthy) or :class:`NoMatch`. Must not mutate the IR."""
        raise NotImplementedError

    def rewrite(self, match: Any, rw: Rewriter, ctx: PassContext) -> NoMatch | bool | None:
        """Apply the rewrite for ``match`` through ``rw``; returning a :class:`NoMatch` (or ``False``)
        declines it, which the rule must do before mutating anything."""
        raise NotImplementedError

    def prepare(self, model: ir.Model) -> Rule:
        """The rule to run on ``model`` (pattern rules bind the model's opsets); ``self`` by default."""
        return self


def apply_rules(
    model: ir.Model,
    rules: Sequence[Rule],
    ctx: PassContext,
    rw: Rewriter,
    *,
    pass_name: str,
    max_steps: int = 100_000,
) -> int:
    """Apply ``rules`` greedily over every graph of ``model`` until none fires.

    Returns:
        The number of rewrites applied.

    Raises:
        PassError: when the step cap is reached (rules that undo each other, say).
    """
    by_root: dict[tuple[str, str], list[Rule]] = defaultdict(list)
    for r in (rule.prepare(model) for rule in rules):
        for op in r.roots:
            by_root[(r.root_domain, op)].append(r)
    steps = 0
    near: dict[int, tuple[ir.Node, str, str, float]] = {}
    graphs = list(model.graph.all_graphs())
    for f in model.functions:
        graphs.extend(f.graph.all_graphs())
    for graph in graphs:
        changed = True
        while changed:
            changed = False
            for node in graph:
                if node.graph is not graph:
                    continue
                for rule in by_root.get((node.domain, node.op_type), ()):
                    m = rule.check(node, ctx)
                    if isinstance(m, NoMatch) or not m:
                        if ctx.explain and isinstance(m, NoMatch) and m.near:
                            _keep_nearest(near, node, rule.name, m)
                        continue
                    with rw.transaction():  # a rewrite that raises half-way leaves no trace
                        applied = rule.rewrite(m, rw, ctx)
                    if isinstance(applied, NoMatch) or applied is False:  # declined before mutating
                        if ctx.explain and isinstance(applied, NoMatch) and applied.near:
                            _keep_nearest(near, node, rule.name, applied)
                        continue
                    rw.count(rule.stat or f"applied {rule.name}")
                    steps += 1
                    changed = True
                    if steps >= max_steps:
                        raise PassError(
                            f"{pass_name}: rules still firing after {max_steps} rewrites "
                            f"(last: {rule.name} at {node.label()}); they may undo each other"
                        )
                    break
    for node, rule_name, reason, _ in near.values():
        if node.graph is not None:
            ctx.note(pass_name, node, f"{rule_name}: {reason}")
    return steps


def _keep_nearest(near: dict[int, tuple[ir.Node, str, str, float]], node: ir.Node, rule: str, m: NoMatch) -> None:
    """Remember ``m`` for ``node`` unless another rule came nearer there."""
    seen = near.get(id(node))
    if seen is None or m.score > seen[3]:
        near[id(node)] = (node, rule, m.reason, m.score)


@dataclass(frozen=True)
class RulesPass(Pass):
    """A pass that is a set of rules applied to a fixed point by :func:`apply_rules`.

    Subclass it with ``name`` and ``rules`` (or override :meth:`rules_for` when the set depends on
    the model), or let :func:`passes.framework.registry.register_rules` make one.
    """

    rules: ClassVar[tuple[Rule, ...]] = ()

    def rules_for(self, model: ir.Model, ctx: PassContext) -> Sequence[Rule]:
        """The rules to apply to ``model`` (``rules`` by default)."""
        return self.rules

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Apply the rules over every graph until none fires."""
        rw = Rewriter()
        apply_rules(model, self.rules_for(model, ctx), ctx, rw, pass_name=self.name)
        return rw.result()
