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
"""

from __future__ import annotations

from typing import Any

from .framework.base import Diagnostic, Pass, PassContext, PassError, PassResult
from .framework.manager import PassManager, PassRecord
from .framework.rules import NoMatch, Rule, apply_rules
from .framework.pipeline import Fixpoint, format_pipeline, parse_pipeline
from .framework.registry import get_pass_class, register_pass, registered_passes
from .framework.rewriter import Rewriter

__all__ = [
    "Diagnostic", "Fixpoint", "NoMatch", "Pass", "PassContext", "PassError", "PassManager",
    "PassRecord", "PassResult", "Rewriter", "Rule", "apply_rules", "compile_model", "CompileResult",
    "format_pipeline", "get_pass_class", "parse_pipeline", "register_pass", "registered_passes",
]


def __getattr__(name: str) -> Any:
    # compile_model pulls in onnxruntime; load it only when asked for.
    if name in ("compile_model", "CompileResult"):
        from .tools import compile as _compile

        return getattr(_compile, name)
    raise AttributeError(name)
