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
  ``input_skip_bias_sum`` (the pattern rule replaces the named interior sum too). Targets with
  ``residual_layer_norm = "sum"`` get instead one ``Sum(input, bias, residual)`` before the kept
  ``LayerNormalization`` (onnxruntime's SkipLayerNormalization CPU kernel is the slower of the two
  and it re-fuses a plain ``Add``).

The skip fusion needs the two Add operands' shapes: onnxruntime requires ``input`` to have the full
``[B, S, H]`` (or ``[T, H]``) shape and ``skip`` the same, ``[1, S, H]`` or ``[S, H]``. Models
without value types (TorchScript exports) get ONNX shape inference run once first. Sums with a
position-embedding lookup (a Gather into a constant table at computed indices, which may broadcast
over the batch) are left alone, as onnxruntime's own fusion does: the embedding LayerNorm stays.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

import ir

from ..framework.base import Pass, PassContext, PassError, PassResult
from ..framework.match import (
    channel_param_len, const_array, is_channel_param, is_last_axis_reduce, noop_cast, producer, rank,
)
from ..framework.pattern import Match, PatternRule
from ..framework.rules import NoMatch, apply_rules
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter

__all__ = ["LayerNormFusionPass", "NORM_RULES", "RESIDUAL_RULES", "RESIDUAL_SUM_NORM", "SKIP_NORM"]

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


#: The fused op of a norm over a residual sum.
_SKIP = {"LayerNormalization": "SkipLayerNormalization", "RMSNormalization": "SkipSimplifiedLayerNormalization",
         "SimplifiedLayerNormalization": "SkipSimplifiedLayerNormalization"}


def residual_norm(op, input, skip, gamma, beta):
    """A norm over ``input [+ bias] + skip`` (the bias form tried first), through a no-op Cast."""
    bias = op.const(name="bias", ndim=1, predicate=lambda a: a.size > 1)
    total = op.Add(op.Add(input, bias), skip, _name="sum") | op.Add(input, skip, _name="sum")
    x = total | op.Cast(total, _name="cast")
    return (op.LayerNormalization(x, gamma, beta, _name="norm") | op.LayerNormalization(x, gamma, _name="norm")
            | op.SimplifiedLayerNormalization(x, gamma, _name="norm") | op.RMSNormalization(x, gamma, _name="norm"))


def _position_lookup(v: ir.Value | None) -> bool:
    """A lookup into a constant table at computed indices (position embeddings), through Casts."""
    while (c := producer(v, "Cast")) is not None:
        v = c.inputs[0]
    g = producer(v, "Gather")
    return g is not None and const_array(g.inputs[0]) is not None and not g.inputs[1].is_graph_input()


def _layout(input: ir.Value, skip: ir.Value, hidden: int | None) -> bool | str:
    """``input`` of the full shape ``[B, S, H]`` or ``[T, H]``; ``skip`` the same, ``[1, S, H]`` or ``[S, H]``."""
    # Two symbolic dims are taken to be equal: ONNX shape inference names the batch of different
    # branches differently. Operands that may broadcast (position lookups) are excluded before.
    f, s = input.shape, skip.shape
    if f is None or s is None:
        return "the residual Add's operand shapes are unknown"
    tail = s[1:] if len(s) == 3 and s[0] == 1 else s  # a [1, S, H] skip broadcasts over the batch
    return (len(f) in (2, 3) and isinstance(f[-1], int) and hidden in (None, f[-1]) and len(s) in (len(f), 2)
            and all(a == b or not isinstance(a, int) and not isinstance(b, int) for a, b in zip(f[-len(tail):], tail))
            ) or f"residual Add shapes {f} and {s} do not fit SkipLayerNormalization"


def check_residual(m: Match, ctx: PassContext) -> bool | str | NoMatch:
    """The target's form; a norm over the last axis, γ/β per channel; two activations laid out as the op needs."""
    # The sum form is for LayerNormalization on targets with residual_layer_norm = "sum" (the pass
    # runs these rules on targets with onnxruntime's contrib ops only). The norm's mean and inv-std
    # outputs are unread: the matcher refuses a match whose root's other outputs are read.
    norm, cast, t = m.node("norm"), m.node("cast"), ctx.target
    sum_form = norm.op_type == "LayerNormalization" and t is not None and t.residual_layer_norm == "sum"
    if sum_form != (m.rule.name == "residual-sum-norm") or cast is not None and noop_cast(cast.outputs[0]) is None:
        return NoMatch("the other residual form is the target's, or the Cast changes the dtype")
    if norm.attr("axis", -1) not in (-1, (rank(norm.inputs[0]) or 0) - 1) or norm.attr("stash_type", 1) != 1:
        return "the norm is not over the last axis, or its stash_type is not float32"
    if not is_channel_param(m.gamma) or (m.beta is not None and not is_channel_param(m.beta)):
        return "γ/β are not 1-D parameters"
    if const_array(m.input) is not None or const_array(m.skip) is not None:
        return "the Add before the norm adds a constant, not a residual"
    if _position_lookup(m.input) or _position_lookup(m.skip):
        return "embedding sum with a position lookup (may broadcast); left as LayerNorm"
    return _layout(m.input, m.skip, channel_param_len(m.gamma))


def skip_fused(op, input, skip, bias, gamma, beta, match):
    """Skip(Simplified)LayerNormalization; its 4th output, the sum, where the sum is read elsewhere."""
    norm, read_on = match.node("norm"), match.read_elsewhere("sum") or match.read_elsewhere("cast")
    params = [gamma, beta] if norm.op_type == "LayerNormalization" else [gamma]
    names = ["skip_norm", None, None, "residual_sum"] if read_on else ["skip_norm"]
    outs = getattr(op, _SKIP[norm.op_type])(input, skip, *params, bias, epsilon=float(norm.attr("epsilon", 1e-5)),
                                            _domain=_MS, _outputs=names)
    return {"out": outs[0], "sum": outs[3], "cast": outs[3]} if read_on else outs


def residual_sum(op, input, skip, bias, match):
    """One ``Sum(input, bias, skip)`` wherever the sum was read; the LayerNormalization is kept."""
    total = op.Sum(input, *([] if bias is None else [bias]), skip, _outputs=["residual_sum"])
    return {"out": match.root.outputs[0], "sum": total, "cast": total}


#: The residual folds, applied once the norms are fused: a norm over ``input [+ bias] + skip`` →
#: Skip(Simplified)LayerNormalization, or, on targets with ``residual_layer_norm = "sum"``, one
#: ``Sum`` before the LayerNormalization. onnxruntime re-fuses an ``Add`` before a
#: LayerNormalization into SkipLayerNormalization, whose CPU kernel (scalar, a division per
#: element) measured 2.4-3× slower than Sum + LayerNormalization at 16-128 tokens; one ``Sum``
#: also folds the bias Add, so the node count matches the skip form.
SKIP_NORM = PatternRule("skip-layer-norm", residual_norm, skip_fused, check=check_residual, stat="fused SkipLayerNorm",
                        requires={_MS: ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"]})
RESIDUAL_SUM_NORM = PatternRule("residual-sum-norm", residual_norm, residual_sum, check=check_residual,
                                stat="residual Sum before LayerNorm")
RESIDUAL_RULES = (RESIDUAL_SUM_NORM, SKIP_NORM)


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
        # On the sum form the Sum rule goes first (the skip rule is then left the simplified norms).
        residual = RESIDUAL_RULES if skip and ctx.target.residual_layer_norm == "sum" else (SKIP_NORM,)
        if skip and apply_rules(model, residual, ctx, rw, pass_name=self.name):
            rw.import_opset(model, _MS)
        return rw.result()
