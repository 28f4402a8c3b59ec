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

from .base import PassContext, PassError
from .rewriter import Rewriter

__all__ = ["Rule", "NoMatch", "apply_rules"]


@dataclass(frozen=True)
class NoMatch:
    """Why a rule did not match. ``near`` marks a near miss worth telling the user about."""

    reason: str
    near: bool = False

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

    def rewrite(self, match: Any, rw: Rewriter, ctx: PassContext) -> None:
        """Apply the rewrite for ``match`` through ``rw``."""
        raise NotImplementedError


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
    for r in rules:
        for op in r.roots:
            by_root[(r.root_domain, op)].append(r)
    steps = 0
    near: dict[int, tuple[ir.Node, str, str]] = {}
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
                domain = node.domain if node.domain != "ai.onnx" else ""
                for rule in by_root.get((domain, node.op_type), ()):
                    m = rule.check(node, ctx)
                    if isinstance(m, NoMatch) or not m:
                        if ctx.explain and isinstance(m, NoMatch) and m.near:
                            near[id(node)] = (node, rule.name, m.reason)
                        continue
                    rule.rewrite(m, rw, ctx)
                    rw.count(rule.stat or f"applied {rule.name}")
                    steps += 1
                    changed = True
                    if steps >= max_steps:
                        raise PassError(
                            f"{pass_name}: rules still firing after {max_steps} rewrites "
                            f"(last: {rule.name} at {node.label()}); they may undo each other"
                        )
                    break
    for node, rule_name, reason in near.values():
        if node.graph is not None:
            ctx.note(pass_name, node, f"{rule_name}: {reason}")
    return steps
