"""LayerNorm and RMSNorm fusion, then the residual Add folded in (SkipLayerNormalization).

Decomposed norms (``x`` normalized over its last axis; ``γ``/``β`` 1-D and optional)::

    LayerNorm:  d = x - ReduceMean(x);  y = d / Sqrt(ReduceMean(d²) + ε) * γ + β
    RMSNorm:    y = x / Sqrt(ReduceMean(x²) + ε) * γ

with ``d²`` as ``Pow(d, 2)`` or ``Mul(d, d)``, the division as ``Div`` or a multiplication by
``Reciprocal(..)`` / ``Div(1, ..)``, ReduceMean's axes as an attribute or (opset 18) an input, and
a no-op ``Cast`` between the normalization and ``γ`` (Llama's TorchScript export).

Output:

* LayerNorm → standard ``LayerNormalization`` (opset 17+);
* RMSNorm → ``SimplifiedLayerNormalization`` when the target provides onnxruntime's contrib norms
  (onnxruntime registers that op in the default ONNX domain), else standard ``RMSNormalization``
  when the model imports opset 23+, else the pattern stays;
* a norm (fused here, or already in the model, as the dynamo exporter emits ``LayerNormalization``)
  reading a residual ``Add(a, b)`` of two activations → ``com.microsoft`` ``SkipLayerNormalization``
  / ``SkipSimplifiedLayerNormalization`` (inputs ``input, skip, gamma[, beta][, bias]``), folding
  a bias ``Add(Add(MatMul, bias), residual)`` too. When the sum is read elsewhere (pre-LN models
  such as GPT-2 and Llama carry the residual stream on), those reads use the op's 4th output
  ``input_skip_bias_sum``. Targets with ``residual_layer_norm = "sum"`` get instead one
  ``Sum(input, bias, residual)`` before a kept ``LayerNormalization`` (onnxruntime's
  SkipLayerNormalization CPU kernel is the slower of the two and it re-fuses a plain ``Add``).

The skip fusion needs the two Add operands' shapes: onnxruntime requires ``input`` to have the full
``[B, S, H]`` (or ``[T, H]``) shape and ``skip`` the same, ``[1, S, H]`` or ``[S, H]``. Models
without value types (TorchScript exports) get ONNX shape inference run once first. Sums with a
position-embedding lookup (a Gather into a constant table at computed indices, which may broadcast
over the batch) are left alone, as onnxruntime's own fusion does: the embedding LayerNorm stays.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

import ir

from ..framework.base import Pass, PassContext, PassError, PassResult
from ..framework.match import (
    channel_param_len, const_array, is_channel_param, is_last_axis_reduce, noop_cast, only_users, operands, producer, rank,
    single_use,
)
from ..framework.pattern import Match, PatternRule
from ..framework.rules import NoMatch, Rule, apply_rules
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter

__all__ = ["LayerNormFusionPass", "NORM_RULES", "ResidualSumNormFusion", "SkipNormFusion"]

_MS = "com.microsoft"
_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")


def _simplified_ok(ctx: PassContext) -> bool:
    # onnxruntime's SimplifiedLayerNormalization lives in the default domain but is a contrib op;
    # targets list it among their contrib ops.
    return ctx.target is not None and ctx.target.supports("SimplifiedLayerNormalization", _MS)


def _mean(op, v, name):
    """``ReduceMean(v)``, its axes an attribute or (opset 18) a constant input."""
    return op.ReduceMean(v, _name=name) | op.ReduceMean(v, op.const(), _name=name)


def _normalized(op, d, square):
    """``d / Sqrt(ReduceMean(square) + ε)``, the division as Div or a product with the reciprocal."""
    std = op.Sqrt(op.Add(_mean(op, square, "var"), op.const(name="eps", predicate=lambda a: a.size == 1)))
    return op.Div(d, std) | op.Mul(d, op.Reciprocal(std)) | op.Mul(d, op.Div(1.0, std))


def layer_norm(op, x):
    d = op.Sub(x, _mean(op, x, "mean"))
    return _normalized(op, d, op.Pow(d, 2.0) | op.Mul(d, d))


def rms_norm(op, x):
    return _normalized(op, x, op.Pow(x, 2.0) | op.Mul(x, x))


def _hidden(m: Match) -> int | None:
    """The normalized size: the input's last dim, else the length of the γ that follows."""
    if m.x.shape is not None and isinstance(m.x.shape[-1], int):
        return m.x.shape[-1]
    v = m.root.outputs[0]
    if len(v.uses()) == 1 and noop_cast(v.uses()[0][0].outputs[0]) is not None:  # through a no-op Cast
        v = v.uses()[0][0].outputs[0]
    user = v.uses()[0][0] if len(v.uses()) == 1 else None
    gammas = [g for g in user.inputs if is_channel_param(g)] if user is not None and user.op_type == "Mul" else []
    return channel_param_len(gammas[0]) if gammas else None


def check_norm(m: Match, ctx: PassContext) -> bool | str:
    if any(n is not None and not is_last_axis_reduce(n, rank(m.x)) for n in (m.node("mean"), m.node("var"))):
        return "ReduceMean is not over the last axis with keepdims"
    if m.rule.name == "rms-norm" and (sub := producer(m.x, "Sub")) is not None and producer(sub.inputs[1], "ReduceMean"):
        return NoMatch("a centred norm is a LayerNorm")
    if _hidden(m) is None:
        return "no γ and the hidden size is unknown"
    if m.rule.name == "layer-norm":
        return m.opset() >= 17 or f"LayerNormalization needs opset 17, the model imports {m.opset()}"
    return _simplified_ok(ctx) or m.opset() >= 23 or f"RMSNormalization needs opset 23, the model imports {m.opset()}"


def fused_norm(op, x, eps, match, ctx):
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    ones = op.const(np.ones([_hidden(match)], dtype=dtype))
    attrs = {"axis": -1, "epsilon": float(match.const("eps").reshape(-1)[0])}
    if match.rule.name == "layer-norm":
        return op.LayerNormalization(x, ones, **attrs)
    if _simplified_ok(ctx):
        return op.SimplifiedLayerNormalization(x, ones, **attrs, stash_type=1)
    return op.RMSNormalization(x, ones, **attrs)


def _norm(op, x, g):
    return (op.LayerNormalization(x, g, _name="norm") | op.SimplifiedLayerNormalization(x, g, _name="norm")
            | op.RMSNormalization(x, g, _name="norm"))


def times_gamma(op, x, g, gamma):
    n = _norm(op, x, g)
    return op.Mul(n | op.Cast(n, _name="cast"), gamma)


def plus_beta(op, x, gamma, beta):
    return op.Add(op.LayerNormalization(x, gamma, _name="norm"), beta)


def check_affine(m: Match, ctx: PassContext) -> bool | str:
    """γ and β are 1-D parameters of the normalized size; γ folds only into a norm with unit weight."""
    param = m.gamma if m.rule.name == "norm-gamma" else m.beta
    if not is_channel_param(param) or channel_param_len(param) != channel_param_len(m.node("norm").inputs[1]):
        return NoMatch("not a per-channel parameter")
    cast = m.node("cast")
    if cast is not None and noop_cast(cast.outputs[0]) is None:
        return NoMatch("the Cast changes the dtype")
    ones = const_array(m.g) if m.rule.name == "norm-gamma" else None
    return m.rule.name != "norm-gamma" or (ones is not None and bool(np.all(ones == 1)))


def with_param(op, x, gamma, match, beta=None):
    norm = match.node("norm")
    inputs = [x, gamma] if beta is None else [x, gamma, beta]
    return getattr(op, norm.op_type)(*inputs, **norm.attributes)


NORM_RULES = (
    PatternRule("layer-norm", layer_norm, fused_norm, check=check_norm, stat="fused LayerNorm"),
    PatternRule("rms-norm", rms_norm, fused_norm, check=check_norm, stat="fused LayerNorm"),
    PatternRule("norm-gamma", times_gamma, with_param, check=check_affine, stat="folded LayerNorm γ"),
    PatternRule("norm-beta", plus_beta, with_param, check=check_affine, stat="folded LayerNorm β"),
)


@dataclass
class _Skip:
    norm: ir.Node
    add: ir.Node
    input: ir.Value
    skip: ir.Value
    bias: ir.Value | None
    erase: list[ir.Node]
    sum_used: bool
    after_add: bool
    cast: ir.Node | None = None


def _position_lookup(v: ir.Value | None) -> bool:
    """A lookup into a constant table at computed indices (position embeddings), through Casts."""
    while (c := producer(v, "Cast")) is not None:
        v = c.inputs[0]
    g = producer(v, "Gather")
    if g is None or const_array(g.inputs[0]) is None or g.inputs[1] is None:
        return False
    return not g.inputs[1].is_graph_input()


def _same_dim(a: object, b: object) -> bool:
    # Two symbolic (or unknown) dims are taken to be equal: ONNX shape inference names the batch of
    # different branches differently. Operands that may broadcast (position lookups) are excluded
    # before this is asked.
    return a == b or (not isinstance(a, int) and not isinstance(b, int))


def _layout(a: ir.Value, b: ir.Value, hidden: int | None) -> tuple[ir.Value, ir.Value] | NoMatch:
    """Which operand is SkipLayerNormalization's ``input`` (full shape) and which its ``skip``."""
    sa, sb = a.shape, b.shape
    if sa is None or sb is None:
        return NoMatch("the residual Add's operand shapes are unknown", near=True)
    if a.dtype is not None and b.dtype is not None and a.dtype != b.dtype:
        return NoMatch("the residual Add mixes dtypes", near=True)
    for full, other in ((a, b), (b, a)):
        sf, so = full.shape, other.shape
        assert sf is not None and so is not None
        if len(sf) not in (2, 3) or not isinstance(sf[-1], int) or (hidden is not None and sf[-1] != hidden):
            continue
        if len(so) == len(sf) and all(_same_dim(x, y) for x, y in zip(sf, so)):
            if len(sf) == 3 and so[0] == 1 and sf[0] != 1 and not isinstance(sf[0], int):
                return full, other  # [1,S,H] skip broadcast over a symbolic batch
            if len(sf) == 3 and sf[0] == 1 and isinstance(so[0], int) and so[0] != 1:
                continue
            return full, other
        if len(sf) == 3 and len(so) == 3 and so[0] == 1 and all(_same_dim(x, y) for x, y in zip(sf[1:], so[1:])):
            return full, other
        if len(sf) == 3 and len(so) == 2 and all(_same_dim(x, y) for x, y in zip(sf[1:], so)):
            return full, other
    return NoMatch(f"residual Add shapes {sa} and {sb} do not fit SkipLayerNormalization", near=True)


def _match_residual(node: ir.Node, *, keep_norm: bool) -> _Skip | NoMatch:
    """The residual ``Add`` (and a bias ``Add`` under it) read by the norm ``node``.

    ``keep_norm``: the norm stays where it is and only the sums are replaced, so computed γ/β do
    not restrict where the replacement may go.
    """
    simplified = node.op_type != "LayerNormalization"
    x = node.inputs[0]
    # A no-op Cast between the sum and the norm (Llama's TorchScript export) is looked through.
    cast = noop_cast(x)
    add = producer(cast.inputs[0] if cast is not None else x, "Add")
    if x is None or add is None:
        return NoMatch("no residual Add")
    if any(o is not None and (o.has_uses() or o.is_graph_output()) for o in node.outputs[1:]):
        return NoMatch("the norm's mean/inv-std outputs are read", near=True)
    r = rank(x)
    axis = node.attr("axis", -1)
    if axis != -1 and not (r is not None and axis == r - 1):
        return NoMatch(f"norm over axis {axis}, not the last one", near=True)
    if node.attr("stash_type", 1) != 1:
        return NoMatch("stash_type is not float32", near=True)
    gamma = node.inputs[1] if len(node.inputs) > 1 else None
    beta = node.inputs[2] if len(node.inputs) > 2 and not simplified else None
    if not is_channel_param(gamma) or (beta is not None and not is_channel_param(beta)):
        return NoMatch("γ/β are not 1-D parameters", near=True)
    a, b = add.inputs[0], add.inputs[1]
    if a is None or b is None or const_array(a) is not None or const_array(b) is not None:
        return NoMatch("the Add before the norm adds a constant, not a residual", near=True)
    if _position_lookup(a) or _position_lookup(b):
        return NoMatch("embedding sum with a position lookup (may broadcast); left as LayerNorm", near=True)
    hidden = channel_param_len(gamma)
    total = add.outputs[0]
    assert total is not None
    sum_used = not only_users(x, {node}) or (cast is not None and not only_users(total, {cast}))
    # Constants and graph inputs (γ, β, bias) are defined before any node: then the fused op
    # can take the Add's place, where every other reader of the sum is sure to follow it.
    after_add = all(v is None or v.producer() is None for v in (gamma, beta))
    if sum_used and not after_add and not keep_norm:
        return NoMatch("γ/β are computed and the residual sum is read elsewhere", near=True)
    failure: NoMatch | None = None
    for p, q in operands(add):
        inner = producer(p, "Add")
        if inner is None or not single_use(p):
            continue
        for m, bias in operands(inner):
            if m is None or not is_channel_param(bias) or const_array(m) is not None or channel_param_len(bias) != hidden:
                continue
            if _position_lookup(m) or bias.producer() is not None:
                continue
            lay = _layout(m, q, hidden)
            if isinstance(lay, NoMatch):
                failure = lay
                continue
            if lay[0] is not m:
                continue  # the bias must go with the full-shape input
            return _Skip(node, add, m, q, bias, [node, add, inner], sum_used, after_add, cast)
    lay = _layout(a, b, hidden)
    if isinstance(lay, NoMatch):
        return failure or lay
    return _Skip(node, add, lay[0], lay[1], None, [node, add], sum_used, after_add, cast)


@dataclass(frozen=True)
class SkipNormFusion(Rule):
    """A norm over a residual ``Add`` (optionally ``Add(Add(MatMul, bias), residual)``) → Skip(Simplified)LayerNormalization."""

    name: ClassVar[str] = "skip-layer-norm"
    roots: ClassVar[tuple[str, ...]] = _NORMS
    stat: ClassVar[str] = "fused SkipLayerNorm"

    def check(self, node: ir.Node, ctx: PassContext) -> _Skip | NoMatch:
        simplified = node.op_type != "LayerNormalization"
        op = "SkipSimplifiedLayerNormalization" if simplified else "SkipLayerNormalization"
        if ctx.target is None or not ctx.target.supports(op, _MS):
            return NoMatch(f"the target does not provide {op}")
        if not simplified and ctx.target.residual_layer_norm == "sum":
            return NoMatch("the target keeps LayerNormalization over a residual Sum")
        return _match_residual(node, keep_norm=False)

    def rewrite(self, match: _Skip, rw: Rewriter, ctx: PassContext) -> None:
        norm = match.norm
        simplified = norm.op_type != "LayerNormalization"
        gamma = norm.inputs[1]
        eps = float(norm.attr("epsilon", 1e-5))
        if simplified:
            op = "SkipSimplifiedLayerNormalization"
            inputs: list[ir.Value | None] = [match.input, match.skip, gamma, match.bias]
        else:
            op = "SkipLayerNormalization"
            beta = norm.inputs[2] if len(norm.inputs) > 2 else None
            inputs = [match.input, match.skip, gamma, beta, match.bias]
        while inputs[-1] is None:
            inputs.pop()
        out = norm.outputs[0]
        total = match.add.outputs[0]
        assert out is not None and total is not None
        names: list[str | None] = ["skip_norm"]
        types = [out.type]
        if match.sum_used:
            names += [None, None, "residual_sum"]
            types += [None, None, total.type]
        where = {"after": match.add} if match.after_add else {"before": norm}
        new = rw.make(op, inputs, {"epsilon": eps}, domain=_MS, output_names=names, types=types, **where)
        rw.replace_all_uses_with(out, new.outputs[0])
        rw.erase(norm)
        if match.cast is not None:
            cast_out = match.cast.outputs[0]
            assert cast_out is not None
            if match.sum_used:
                rw.replace_all_uses_with(cast_out, new.outputs[3])  # type: ignore[arg-type]
            rw.erase(match.cast)
        if match.sum_used:
            rw.replace_all_uses_with(total, new.outputs[3])  # type: ignore[arg-type]
        rw.erase([n for n in match.erase if n is not norm])


@dataclass(frozen=True)
class ResidualSumNormFusion(Rule):
    """``LayerNormalization(Add(Add(MatMul, bias), residual))`` → ``LayerNormalization(Sum(MatMul, bias, residual))``.

    For targets with ``residual_layer_norm = "sum"``: onnxruntime re-fuses an ``Add`` before a
    LayerNormalization into SkipLayerNormalization, whose CPU kernel (scalar, a division per
    element) measured 2.4-3× slower than Sum + LayerNormalization at 16-128 tokens. One ``Sum``
    also folds the bias Add, so the node count matches the skip form.
    """

    name: ClassVar[str] = "residual-sum-norm"
    roots: ClassVar[tuple[str, ...]] = ("LayerNormalization",)
    stat: ClassVar[str] = "residual Sum before LayerNorm"

    def check(self, node: ir.Node, ctx: PassContext) -> _Skip | NoMatch:
        if ctx.target is None or ctx.target.residual_layer_norm != "sum" or not ctx.target.has_contrib_ops:
            return NoMatch("the target folds residual Adds into SkipLayerNormalization")
        return _match_residual(node, keep_norm=True)

    def rewrite(self, match: _Skip, rw: Rewriter, ctx: PassContext) -> None:
        total = match.add.outputs[0]
        assert total is not None
        inputs = [match.input, *([match.bias] if match.bias is not None else []), match.skip]
        new = rw.make("Sum", inputs, {}, output_names=["residual_sum"], types=[total.type], after=match.add)
        if match.cast is not None:
            cast_out = match.cast.outputs[0]
            assert cast_out is not None
            rw.replace_all_uses_with(cast_out, new.outputs[0])
            rw.erase(match.cast)
        rw.replace_all_uses_with(total, new.outputs[0])
        rw.erase([n for n in match.erase if n is not match.norm])


# ----------------------------------------------------------------------------------------- #
# The pass
# ----------------------------------------------------------------------------------------- #


def _needs_types(model: ir.Model, skip: bool) -> bool:
    """True when a candidate lacks the value types the rules need (TorchScript exports carry none)."""
    has_mean = False
    for g in model.graph.all_graphs():
        for n in g:
            if n.op_type == "ReduceMean":
                has_mean = True
                # The norm's input x: ReduceMean(x) (LayerNorm) or ReduceMean(x²) (RMSNorm).
                x = n.inputs[0]
                sq = producer(x, "Pow", "Mul")
                if sq is not None:
                    x = sq.inputs[0]
                while (c := producer(x, "Cast")) is not None:
                    x = c.inputs[0]
                a = producer(x, "Add")
                if skip and a is not None and any(v is not None and v.shape is None for v in a.inputs):
                    return True
            if skip and n.op_type in _NORMS and (a := producer(n.inputs[0], "Add")) is not None:
                if any(v is not None and v.shape is None for v in a.inputs):
                    return True
    if not has_mean:
        return False
    return any(n.op_type == "Cast" and n.inputs[0] is not None and n.inputs[0].dtype is None
               for g in model.graph.all_graphs() for n in g)


def _infer_types(model: ir.Model, rw: Rewriter) -> None:
    """Run ONNX shape inference, recording each new type through the rewriter."""
    values = [o for g in model.graph.all_graphs() for n in g for o in n.outputs if o is not None]
    before = [v.type for v in values]
    ir.infer_shapes(model)
    for v, old in zip(values, before):
        new = v.type
        if new != old:
            v.type = old
            rw.set_type(v, new)


@register_pass
@dataclass(frozen=True)
class LayerNormFusionPass(Pass):
    """Fuse decomposed LayerNorm/RMSNorm, then fold residual Adds into Skip(Simplified)LayerNormalization."""

    name: ClassVar[str] = "fuse-layer-norm"
    summary: ClassVar[str] = "fuse LayerNorm/RMSNorm patterns and residual Adds into (Skip)LayerNormalization"

    #: The residual form, ``skip`` or ``sum``; empty follows the target's ``residual_layer_norm``
    #: (``--autotune`` measures both).
    residual: str = ""

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Norm rules first (so skip fusion sees every norm), then the skip rule, each to a fixed point."""
        if self.residual not in ("", "skip", "sum"):
            raise PassError(f"fuse-layer-norm: residual must be skip or sum, not {self.residual!r}")
        if self.residual and ctx.target is not None:  # the rules read the form off the target
            ctx = dataclasses.replace(ctx, target=dataclasses.replace(ctx.target, residual_layer_norm=self.residual))
        rw = Rewriter()
        skip = ctx.target is not None and ctx.target.has_contrib_ops
        if _needs_types(model, skip):
            _infer_types(model, rw)
        apply_rules(model, NORM_RULES, ctx, rw, pass_name=self.name)
        rw.remove_unused_constants()
        if skip and apply_rules(model, [SkipNormFusion(), ResidualSumNormFusion()], ctx, rw, pass_name=self.name):
            rw.import_opset(model, _MS)
        return rw.result()
