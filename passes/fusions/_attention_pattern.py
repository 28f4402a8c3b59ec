"""The syntactic half of the attention match, as patterns on the framework's matcher.

:mod:`passes.fusions._attention_match` resolves each attention operand with these: the operand
path back to its projection (layout ops, scalar scales, an optional GQA ``Expand``, KV-cache
``Concat``, ``RotaryEmbedding`` and a q/k ``SimplifiedLayerNormalization``) and the projection itself (``MatMul`` with an optional bias
``Add``, or a ``Gemm`` of a flattened input). They are plain pattern functions
(:class:`~passes.framework._pattern_match.CompiledPattern`); the segment of a packed projection
and what the paths compute are decided by shapes and by evaluation, not here.
"""

from __future__ import annotations

from collections.abc import Iterator

import ir

from ..framework._pattern_match import CompiledPattern, Match
from ..framework.match import const_array, scalar
from ..framework._pattern_terms import absent_or, capture

__all__ = ["MS", "LAYOUT_OPS", "MASK_OPS", "layout_input", "walk_layout", "scores_matmuls", "operand_path", "path_nodes",
           "projection", "projection_base"]

MS = "com.microsoft"
#: Ops that only move data between the projections and the attention MatMuls.
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Cast"})
# What a layout walk may pass: layout ops, a Concat or Slice that copies its input, a scalar scale.
_WALK_OPS = LAYOUT_OPS | {"Concat", "Slice", "Mul", "Div"}
_RESHAPES = frozenset({"Reshape", "Flatten", "Identity"})
#: Ops that may sit between the scores MatMul and the Softmax (scaling and masking).
MASK_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast"})


def _empty_along(v: ir.Value, axis: int | None) -> bool:
    shape = v.shape
    return (axis is not None and shape is not None and -len(shape) <= axis < len(shape)
            and shape[axis] == 0)


def copied_input(p: ir.Node) -> ir.Value | None:
    """The input a Concat or Slice merely copies, else ``None``.

    A one-input Concat (a base decoder exported with ``use_cache`` on joins each new K/V to an
    empty cache, and the exporter folds the empty part away), a Concat with an empty operand
    and a Slice of the whole axis (the partial-rotary code path with the full head rotated:
    ``cat(rotate(q[..., :d]), q[..., d:])``, Phi-3).
    """
    if p.op_type == "Concat":
        axis = p.attr("axis")
        full = [x for x in p.inputs if x is None or not _empty_along(x, axis)]
        return full[0] if len(full) == 1 and full[0] is not None else None
    if p.op_type == "Slice" and len(p.inputs) >= 4:
        starts, ends, axes = (const_array(p.inputs[i]) for i in (1, 2, 3))
        steps = const_array(p.inputs[4]) if len(p.inputs) > 4 and p.inputs[4] is not None else None
        shape = p.inputs[0].shape
        if starts is None or ends is None or axes is None or shape is None or starts.size != 1 or axes.size != 1:
            return None
        axis = int(axes.reshape(-1)[0])
        dim = shape[axis] if -len(shape) <= axis < len(shape) else None
        if (isinstance(dim, int) and int(starts.reshape(-1)[0]) == 0 and int(ends.reshape(-1)[0]) >= dim
                and (steps is None or int(steps.reshape(-1)[0]) == 1)):
            return p.inputs[0]
    return None


def layout_input(p: ir.Node) -> ir.Value | None:
    """The value a layout step ``p`` rearranges (the ``follow`` of the layout walk), else ``None``."""
    if p.op_type in LAYOUT_OPS:
        return p.inputs[0]
    copied = copied_input(p)
    if copied is not None:
        return copied
    if p.op_type in ("Mul", "Div") and len(p.inputs) == 2:
        a, b = p.inputs
        if scalar(b) is not None:
            return a
        if p.op_type == "Mul" and scalar(a) is not None:
            return b
    return None


def _layout(op, x, name: str):
    return op.through(x, ops=_WALK_OPS, follow=layout_input, _name=name)


def _unset(v: object) -> bool:
    return not v


def _computed_inputs(p: ir.Node) -> list[ir.Value]:
    if p.op_type == "Reshape":  # the data, never the computed target shape
        return [p.inputs[0]] if p.inputs and p.inputs[0] is not None else []
    return [x for x in p.inputs if x is not None and const_array(x) is None]


def _scores(op, query, key):
    # Any computed input of a scale or mask op may lead to the scores; the nearest MatMuls first.
    # A Reshape may sit among them: Bloom's 3-D scores [B·N, S, T] are viewed as [B, N, S, T]
    # for the mask (whether that is a view of the heads is checked by evaluation).
    return op.through(op.MatMul(query, key, _name="scores"), ops=MASK_OPS | {"Reshape"}, follow=_computed_inputs,
                      lazy=True, max=8, _name="mask_ops")


def _layout_walk(op, src):
    return _layout(op, src, "layout")


def _operand_path(op, src, past):
    # From the operand back: layout, [Expand], layout, [Concat(past, ·)], layout, [RotaryEmbedding],
    # layout, [RMSNorm], layout, the projection. An optional step is an alternative with the walk
    # going on without it.
    s4 = _layout(op, src, "l4")
    # Qwen3 / OLMo-2: an RMSNorm of q and k over each head (or the whole projection) before rotary.
    norm = op.SimplifiedLayerNormalization(s4, op.const(name="norm_weight", ndim=1), axis=absent_or(-1),
                                           _name="norm")
    s3 = _layout(op, norm | s4, "l3")
    # Only the rotary attributes the 3-D rewrite can copy (it sets num_heads again for a partial
    # rotary, which onnxruntime requires beside rotary_embedding_dim in the 4-D form too).
    rotary = op.any_of({"RotaryEmbedding"}, s3, _domain=MS, _name="rotary", is_packed_batching=_unset)
    s2 = _layout(op, rotary | s3, "l2")
    s1 = _layout(op, op.Concat(past, s2, axis=lambda a: a in (2, -2), _name="concat") | s2, "l1")
    return _layout(op, op.any_of({"Expand"}, s1, _name="repeat") | s1, "l0")


def _projection(op, x):
    mm = op.MatMul(x, op.const(name="weight", ndim=2), _name="mm")
    flat = op.any_of({"Reshape", "Flatten"}, x, _name="flat")
    gemm_weight = op.const(name="gemm_weight", ndim=2)
    gemm = dict(alpha=absent_or(1.0), beta=absent_or(1.0), transA=absent_or(0), transB=capture("trans_b"), _name="gemm")
    linear = (op.Add(mm, op.const(name="bias", predicate=lambda a: a.ndim <= 1), _name="bias_add") | mm
              | op.Gemm(flat, gemm_weight, op.const(name="gemm_bias", predicate=lambda a: a.ndim <= 1), **gemm)
              | op.Gemm(flat, gemm_weight, None, **gemm))
    return op.through(linear, ops=_RESHAPES, _name="reshapes")


def _base(op, base):
    return op.through(base, ops=_RESHAPES, _name="reshapes")


_SCORES = CompiledPattern(_scores, "attention scores")
_LAYOUT = CompiledPattern(_layout_walk, "attention layout")
_PATH = CompiledPattern(_operand_path, "attention operand")
_PROJECTION = CompiledPattern(_projection, "attention projection")
_BASE = CompiledPattern(_base, "projection base")


def _first(pattern: CompiledPattern, v: ir.Value) -> Match:
    m = pattern.match(v)
    assert isinstance(m, Match), m  # the pattern ends in a variable: it always matches
    return m


def scores_matmuls(logits: ir.Value) -> Iterator[ir.Node]:
    """The MatMuls that feed ``logits`` through scale and mask ops, nearest first."""
    for m in _SCORES.matches(logits):
        yield m.node("scores")  # type: ignore[misc]


def walk_layout(v: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """Follow layout ops and scalar scales back to the value they rearrange."""
    m = _first(_LAYOUT, v)
    return m.src, m.chain("layout")  # type: ignore[return-value]


def operand_path(v: ir.Value) -> Match:
    """The operand path of attention MatMul input ``v``: ``src``, the chains ``l0``..``l4`` and the
    nodes ``repeat``, ``concat``, ``rotary``, ``norm`` (each ``None`` when absent)."""
    return _first(_PATH, v)


def path_nodes(m: Match) -> list[ir.Node]:
    """The nodes of an operand path from the operand back, in walk order."""
    nodes: list[ir.Node] = []
    for chain, node in (("l0", "repeat"), ("l1", "concat"), ("l2", "rotary"), ("l3", "norm"), ("l4", None)):
        nodes += m.chain(chain) or []
        if node is not None and m.node(node) is not None:
            nodes.append(m.node(node))  # type: ignore[arg-type]
    return nodes


def projection_base(v: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """``v`` back through Reshape/Flatten/Identity, and those nodes."""
    m = _first(_BASE, v)
    return m.base, m.chain("reshapes")  # type: ignore[return-value]


def projection(v: ir.Value) -> Match | str:
    """``v`` as ``x @ W (+ b)`` or ``Gemm(flatten(x), W, b)`` behind reshapes, or why not."""
    m = _PROJECTION.match(v)
    if isinstance(m, Match):
        return m
    base, _ = projection_base(v)
    p = base.producer()
    if p is None:
        return f"%{v.name} is not computed by a projection"
    if p.op_type not in ("Add", "MatMul", "Gemm") or p.domain:
        return f"%{v.name} comes from {p.label()}, not from a MatMul projection"
    return f"{p.label()} is not a projection: {m.reason}"
