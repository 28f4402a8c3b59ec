"""Passes over the IR, the pass manager that runs them, and the ``compile`` entry point.

Write a pass::

    from dataclasses import dataclass
    from typing import ClassVar
    import ir
    from passes import Pass, PassContext, PassResult, Rewriter, register_pass

    @register_pass
    @dataclass(frozen=True)
    class DropIdentityPass(Pass):
        name: ClassVar[str] = "drop-identity"

        def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
            rw = Rewriter()
            for node in model.graph:
                if node.op_type == "Identity" and not node.outputs[0].is_graph_output():
                    rw.replace_all_uses_with(node.outputs[0], node.inputs[0])
                    rw.erase(node)
            return rw.result()

then run it: ``PassManager("drop-identity,dead-flow").run(model)``.

A fusion is shorter as a pattern rule (``docs/write-a-fusion.md`` is the guide)::

    from passes import PatternRule, register_rules

    def silu(op, x):
        return op.Mul(x, op.Sigmoid(x))

    def silu_fused(op, x):
        return op.QuickGelu(x, alpha=1.0, _domain="com.microsoft")

    register_rules("fuse-silu", [PatternRule("silu", silu, silu_fused)])

The layout: :mod:`passes.framework` (pass base, manager, pipelines, registry, rewriter, rules and
the pattern language), :mod:`passes.cleanup`, :mod:`passes.fusions`, :mod:`passes.quantization`
(the passes, discovered by the registry) and :mod:`passes.tools` (the ``tfcompile`` commands).
"""

from __future__ import annotations

from typing import Any

from .framework.base import Diagnostic, Pass, PassContext, PassError, PassResult
from .framework.manager import PassManager, PassRecord
from .framework.pattern import CompiledPattern, Match, PatternRule, absent_or, capture
from .framework.registry import get_pass_class, register_pass, register_rules, registered_passes
from .framework.rules import NoMatch, Rule, RulesPass, apply_rules
from .framework.pipeline import Fixpoint, format_pipeline, parse_pipeline
from .framework.rewriter import Rewriter

__all__ = [
    "CompiledPattern", "Diagnostic", "Fixpoint", "Match", "NoMatch", "Pass", "PassContext", "PassError", "PassManager",
    "PassRecord", "PassResult", "PatternRule", "Rewriter", "Rule", "RulesPass", "absent_or", "apply_rules",
    "capture", "compile_model", "CompileResult", "format_pipeline", "get_pass_class", "parse_pipeline",
    "register_pass", "register_rules", "registered_passes",
]


def __getattr__(name: str) -> Any:
    # compile_model pulls in onnxruntime; load it only when asked for.
    if name in ("compile_model", "CompileResult"):
        from .tools import compile as _compile

        return getattr(_compile, name)
    raise AttributeError(name)
