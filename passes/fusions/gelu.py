"""GELU fusion: the decomposed activation (erf or tanh form, with or without a bias Add) → one op.

Patterns (``x`` is the activation, optionally ``x = Add(MatMul(..), bias)`` with a 1-D constant bias)::

    erf:   0.5 * x * (1 + Erf(x / 1.41421))          Div by √2, or Mul by 1/√2
    tanh:  0.5 * x * (1 + Tanh(√(2/π) * (x + 0.044715 * x³)))   x³ = Pow(x, 3) or x*x*x

The three factors of the outer product may come in any order and association
(``(x*0.5)*t``, ``x*(0.5*t)``, ``(x*t)*0.5``, ``(x*t)/2``); matching flattens the Mul tree. A
standard ``Gelu`` (opset 20, which the dynamo exporter may emit) is a pattern too.

Output, by what the target provides:

* ``com.microsoft`` ops: ``Gelu`` (erf), ``BiasGelu`` (erf with bias), ``FastGelu`` (tanh, with
  the bias as its optional second input);
* standard ops only: ``Gelu`` with ``approximate="none"``/``"tanh"`` when the model imports
  opset 20 or later; older models keep the pattern (a near miss says so).

Exactness first: the erf form never becomes the tanh op, nor the reverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import ir

from ..framework.base import Pass, PassContext, PassResult
from ..framework.match import const_array, is_scalar, only_users, operands, producer, single_use
from ..framework.rules import NoMatch, Rule, apply_rules
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter

__all__ = ["GeluFusionPass", "GeluFusion"]

_MS = "com.microsoft"
_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# Exporters write these constants in float32 and some hand-written models round them (1.4142,
# 0.7071); a relative tolerance of 1e-4 accepts both and nothing else.
_RTOL = 1e-4


@dataclass
class _Gelu:
    """A matched GELU: the ops to erase, the activation, and the bias folded in (if any)."""

    root: ir.Node
    nodes: list[ir.Node]
    x: ir.Value
    approximate: str  # "none" (erf) or "tanh"
    matmul_out: ir.Value | None = None  # set when the bias Add is folded
    bias: ir.Value | None = None


def _close(value: ir.Value | None, expected: float) -> bool:
    return is_scalar(value, expected, rtol=_RTOL)


def _product_leaves(root: ir.Node) -> tuple[list[ir.Value], list[ir.Node], float] | None:
    """Flatten a tree of Mul (and a final Div by a constant) into its factors.

    Interior Muls are absorbed only when their output is read once (by the tree). Returns the
    factors, the absorbed nodes, and a scale from a Div by a constant root (1.0 otherwise).
    """
    scale = 1.0
    nodes = [root]
    stack: list[ir.Value | None]
    if root.op_type == "Div":
        arr = const_array(root.inputs[1])
        if arr is None or arr.size != 1 or float(arr.reshape(-1)[0]) == 0.0:
            return None
        scale = 1.0 / float(arr.reshape(-1)[0])
        stack = [root.inputs[0]]
    else:
        stack = list(root.inputs)
    leaves: list[ir.Value] = []
    while stack:
        v = stack.pop(0)
        if v is None:
            return None
        p = producer(v, "Mul")
        if p is not None and single_use(v) and len(leaves) + len(stack) <= 1:
            nodes.append(p)
            stack[:0] = list(p.inputs)
            continue
        leaves.append(v)
        if len(leaves) > 3:
            return None
    return leaves, nodes, scale


def _erf_argument(u: ir.Value, x: ir.Value) -> list[ir.Node] | None:
    """``u = x / √2`` or ``u = x * (1/√2)``: the nodes, else ``None``."""
    p = producer(u)
    if p is None or not single_use(u):
        return None
    if p.op_type == "Div" and p.inputs[0] is x and _close(p.inputs[1], _SQRT2):
        return [p]
    if p.op_type == "Mul":
        for a, b in operands(p):
            if a is x and _close(b, 1.0 / _SQRT2):
                return [p]
    return None


def _cube(v: ir.Value, x: ir.Value) -> list[ir.Node] | None:
    """``v = Pow(x, 3)`` or ``x*x*x`` (any association): the nodes, else ``None``."""
    p = producer(v)
    if p is None or not single_use(v):
        return None
    if p.op_type == "Pow" and p.inputs[0] is x and _close(p.inputs[1], 3.0):
        return [p]
    if p.op_type == "Mul":
        for a, b in operands(p):
            q = producer(b, "Mul")
            if a is x and q is not None and single_use(b) and q.inputs[0] is x and q.inputs[1] is x:
                return [p, q]
    return None


def _tanh_argument(u: ir.Value, x: ir.Value) -> list[ir.Node] | None:
    """``u = √(2/π) * (x + 0.044715 * x³)``, or the distributed ``√(2/π)*x + 0.0356774*x³``."""
    p = producer(u)
    if p is None or not single_use(u):
        return None
    if p.op_type == "Mul":
        for c, w in operands(p):
            if not _close(c, _SQRT_2_OVER_PI):
                continue
            inner = producer(w, "Add")
            if inner is None or not single_use(w):
                continue
            for a, k3 in operands(inner):
                km = producer(k3, "Mul")
                if a is not x or km is None or not single_use(k3):
                    continue
                for k, cube in operands(km):
                    found = _close(k, 0.044715) and _cube(cube, x)
                    if found:
                        return [p, inner, km, *found]
    if p.op_type == "Add":
        for lin, cub in operands(p):
            lm, cm = producer(lin, "Mul"), producer(cub, "Mul")
            if lm is None or cm is None or not single_use(lin) or not single_use(cub):
                continue
            if not any(a is x and _close(c, _SQRT_2_OVER_PI) for a, c in operands(lm)):
                continue
            for k, cube in operands(cm):
                found = _close(k, _SQRT_2_OVER_PI * 0.044715) and _cube(cube, x)
                if found:
                    return [p, lm, cm, *found]
    return None


def _one_plus(t: ir.Value) -> tuple[ir.Node, ir.Node, str] | None:
    """``t = 1 + Erf(..)`` or ``1 + Tanh(..)``: the Add, the Erf/Tanh node, and the form."""
    add = producer(t, "Add")
    if add is None or not single_use(t):
        return None
    for e, one in operands(add):
        f = producer(e, "Erf", "Tanh")
        if f is not None and single_use(e) and _close(one, 1.0):
            return add, f, "none" if f.op_type == "Erf" else "tanh"
    return None


def _bias_of(x: ir.Value, pattern: list[ir.Node]) -> tuple[ir.Value, ir.Value, ir.Node] | None:
    """``x = Add(MatMul(..), bias)`` with a 1-D constant bias read only by the GELU: the parts."""
    add = producer(x, "Add")
    if add is None or not only_users(x, set(pattern)):
        return None
    for m, b in operands(add):
        arr = const_array(b)
        if producer(m, "MatMul") is not None and arr is not None and arr.ndim == 1 and arr.size > 1:
            return m, b, add
    return None


def _emit(match: _Gelu, rw: Rewriter, ctx: PassContext, contrib: bool) -> None:
    root = match.root
    out = root.outputs[0]
    assert out is not None
    types = [out.type]
    if contrib:
        if match.approximate == "tanh":
            inputs = [match.matmul_out, match.bias] if match.bias is not None else [match.x]
            new = rw.make("FastGelu", inputs, domain=_MS, before=root, types=types)
        elif match.bias is not None:
            new = rw.make("BiasGelu", [match.matmul_out, match.bias], domain=_MS, before=root, types=types)
        else:
            new = rw.make("Gelu", [match.x], domain=_MS, before=root, types=types)
    else:
        new = rw.make("Gelu", [match.x], {"approximate": match.approximate}, before=root, types=types)
    rw.replace_all_uses_with(out, new.outputs[0])
    rw.erase(match.nodes)


def _contrib_ok(ctx: PassContext, approximate: str, bias: bool) -> bool:
    t = ctx.target
    if t is None:
        return False
    op = "FastGelu" if approximate == "tanh" else "BiasGelu" if bias else "Gelu"
    return t.supports(op, _MS)


@dataclass(frozen=True)
class GeluFusion(Rule):
    """Decomposed GELU (erf or tanh form, optional bias Add) → Gelu / BiasGelu / FastGelu."""

    opset: int = 0

    name: ClassVar[str] = "gelu"
    roots: ClassVar[tuple[str, ...]] = ("Mul", "Div")
    stat: ClassVar[str] = "fused Gelu"

    def check(self, node: ir.Node, ctx: PassContext) -> _Gelu | NoMatch:
        flat = _product_leaves(node)
        if flat is None or len(flat[0]) not in (2, 3):
            return NoMatch("not a product of GELU factors")
        leaves, nodes, scale = flat
        for i, t in enumerate(leaves):
            found = _one_plus(t)
            if found is None:
                continue
            add, f, approximate = found
            rest = leaves[:i] + leaves[i + 1 :]
            # The activation x is the factor that is not a constant; the constants multiply to 1/2.
            consts = [v for v in rest if const_array(v) is not None]
            xs = [v for v in rest if const_array(v) is None]
            if len(xs) != 1:
                continue
            half = scale
            for c in consts:
                arr = const_array(c)
                if arr is None or arr.size != 1:
                    half = float("nan")
                    break
                half *= float(arr.reshape(-1)[0])
            if not math.isclose(half, 0.5, rel_tol=_RTOL):
                # Part of a larger product (the 0.5 comes next) is not worth a note.
                out = node.outputs[0]
                inner = out is not None and single_use(out) and out.uses()[0][0].op_type in ("Mul", "Div")
                return NoMatch(f"{f.op_type} product is scaled by {half:g}, not 0.5", near=not inner)
            x = xs[0]
            u = f.inputs[0]
            arg = _erf_argument(u, x) if approximate == "none" else _tanh_argument(u, x)
            if arg is None:
                what = "x/√2" if approximate == "none" else "√(2/π)·(x + 0.044715·x³)"
                return NoMatch(f"{f.op_type} argument is not {what} of the multiplied input", near=True)
            pattern = [*nodes, add, f, *arg]
            match = _Gelu(node, pattern, x, approximate)
            return self._finish(match, ctx)
        return NoMatch("no (1 + Erf/Tanh) factor")

    def _finish(self, match: _Gelu, ctx: PassContext) -> _Gelu | NoMatch:
        bias = _bias_of(match.x, match.nodes)
        contrib = ctx.target is not None and ctx.target.has_contrib_ops
        if contrib:
            if bias is not None and _contrib_ok(ctx, match.approximate, True):
                match.matmul_out, match.bias, add = bias
                match.nodes.append(add)
            elif not _contrib_ok(ctx, match.approximate, False):
                return NoMatch("the target provides no contrib GELU op for this form", near=True)
            return match
        if self.opset < 20:
            return NoMatch(f"standard Gelu needs opset 20, the model imports {self.opset}", near=True)
        return match

    def rewrite(self, match: _Gelu, rw: Rewriter, ctx: PassContext) -> None:
        _emit(match, rw, ctx, contrib=ctx.target is not None and ctx.target.has_contrib_ops)


@dataclass(frozen=True)
class StandardGeluToContrib(Rule):
    """A standard ``Gelu`` (opset 20) → ``com.microsoft`` Gelu/BiasGelu/FastGelu, folding a bias Add."""

    name: ClassVar[str] = "gelu-to-contrib"
    roots: ClassVar[tuple[str, ...]] = ("Gelu",)
    stat: ClassVar[str] = "fused Gelu"

    def check(self, node: ir.Node, ctx: PassContext) -> _Gelu | NoMatch:
        if ctx.target is None or not ctx.target.has_contrib_ops:
            return NoMatch("standard Gelu kept: the target has no contrib ops")
        approximate = node.attr("approximate", "none")
        if isinstance(approximate, bytes):
            approximate = approximate.decode()
        if approximate not in ("none", "tanh") or node.inputs[0] is None:
            return NoMatch(f"Gelu approximate={approximate!r} not understood", near=True)
        bias = _bias_of(node.inputs[0], [node])
        match = _Gelu(node, [node], node.inputs[0], approximate)
        if bias is not None and _contrib_ok(ctx, approximate, True):
            match.matmul_out, match.bias, add = bias
            match.nodes.append(add)
        elif not _contrib_ok(ctx, approximate, False):
            return NoMatch("the target provides no contrib GELU op for this form", near=True)
        return match

    def rewrite(self, match: _Gelu, rw: Rewriter, ctx: PassContext) -> None:
        _emit(match, rw, ctx, contrib=True)


@register_pass
@dataclass(frozen=True)
class GeluFusionPass(Pass):
    """Fuse decomposed GELU activations (and their bias Add) into one op the target provides."""

    name: ClassVar[str] = "fuse-gelu"
    summary: ClassVar[str] = "fuse erf/tanh GELU (and a bias Add) into Gelu, BiasGelu or FastGelu"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Apply the GELU rules to a fixed point."""
        rw = Rewriter()
        rules = [GeluFusion(opset=model.opset("") or 0), StandardGeluToContrib()]
        if apply_rules(model, rules, ctx, rw, pass_name=self.name) and any(n.domain == _MS for n in model.graph.all_nodes()):
            rw.import_opset(model, _MS)
        return rw.result()
