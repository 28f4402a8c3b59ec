"""GELU fusion: the decomposed activation (erf or tanh form, with or without a bias Add) → one op.

Patterns, matched by algebra (``product`` takes any order and association of the factors, and a
``Div`` by a constant as a product with its inverse)::

    erf:   0.5 · x · (1 + Erf(x / √2))
    tanh:  0.5 · x · (1 + Tanh(√(2/π) · (x + 0.044715 · x³)))      x³ = Pow(x, 3) or x·x·x
           ... Tanh(√(2/π)·x + 0.0356774·x³)                          (distributed)
           ... Tanh(√(2/π) · x · (1 + 0.044715 · x · x))              (Bloom's factored form)

``x`` may be ``Add(MatMul(..), bias)`` with a 1-D constant bias, folded in when the target has the
biased op. A standard ``Gelu`` (opset 20, which the dynamo exporter may emit) is a pattern too.

Output, by what the target provides: ``com.microsoft`` ``Gelu`` (erf), ``BiasGelu`` (erf with
bias), ``FastGelu`` (tanh, the bias as its optional second input); standard ops only: ``Gelu``
with ``approximate="none"``/``"tanh"`` when the model imports opset 20 or later (else the pattern
stays and a near miss says so). Exactness first: the erf form never becomes the tanh op.
"""

from __future__ import annotations

import math

from ..framework.match import producer
from ..framework.pattern import Match, PatternRule, capture
from ..framework.registry import register_rules
from ..framework.rules import NoMatch

__all__ = ["GELU_RULES"]

_MS = "com.microsoft"
_C = math.sqrt(2.0 / math.pi)


def _x(op, h):
    """The activation: ``h``, or ``h + bias`` when a bias Add can be folded into the op."""
    return op.Add(h, op.const(name="bias", ndim=1)) | h


def gelu_erf(op, h):
    x = _x(op, h)
    return op.product(0.5, x, op.Add(op.Erf(op.product(x, 1 / math.sqrt(2.0))), 1.0))


def gelu_tanh(op, h):
    x = _x(op, h)
    cube = op.Pow(x, 3.0) | op.product(x, x, x)
    u = (op.product(_C, op.Add(x, op.product(0.044715, cube)))
         | op.Add(op.product(_C, x), op.product(_C * 0.044715, cube))
         | op.product(_C, x, op.Add(op.product(0.044715, x, x), 1.0)))
    return op.product(0.5, x, op.Add(op.Tanh(u), 1.0))


def standard_gelu(op, h):
    return op.Gelu(_x(op, h), approximate=capture("approximate"))


def _form(m: Match) -> str:
    if m.rule.name == "gelu-standard":
        return m.approximate or "none"
    return "tanh" if m.rule.name == "gelu-tanh" else "none"


def _contrib_op(m: Match) -> str:
    return "FastGelu" if _form(m) == "tanh" else "BiasGelu" if m.bias is not None else "Gelu"


def check(m: Match, ctx) -> bool | str:
    """Which op the target can run for this form, and whether the bias Add may be folded."""
    if _form(m) not in ("none", "tanh"):
        return f"Gelu approximate={_form(m)!r} not understood"
    if ctx.target is not None and ctx.target.has_contrib_ops:
        bias = m.const("bias")
        if m.bias is not None and (producer(m.h, "MatMul") is None or bias is None or bias.size < 2):
            return "the Add before the GELU is not a MatMul bias"
        return ctx.target.supports(_contrib_op(m), _MS) or f"the target provides no contrib {_contrib_op(m)}"
    if m.rule.name == "gelu-standard":
        return NoMatch("standard Gelu kept: the target has no contrib ops")
    if m.bias is not None:
        return NoMatch("the standard Gelu takes no bias")
    return m.opset("") >= 20 or f"standard Gelu needs opset 20, the model imports {m.opset('')}"


def fused(op, h, bias, match, ctx):
    if ctx.target is None or not ctx.target.has_contrib_ops:
        return op.Gelu(h, approximate=_form(match))
    name = _contrib_op(match)
    return getattr(op, name)(h, *([bias] if bias is not None else []), _domain=_MS)


GELU_RULES = tuple(
    PatternRule(name, pattern, fused, check=check, stat="fused Gelu")
    for name, pattern in (("gelu-erf", gelu_erf), ("gelu-tanh", gelu_tanh), ("gelu-standard", standard_gelu))
)
GeluFusionPass = register_rules(
    "fuse-gelu", GELU_RULES, "fuse erf/tanh GELU (and a bias Add) into Gelu, BiasGelu or FastGelu"
)
__all__ += ["GeluFusionPass"]
