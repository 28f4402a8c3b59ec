"""The score terms of an attention candidate: what its scores region adds, and why some regions are not fused.

Syntactic helpers of :mod:`passes.fusions._attention_check` (no evaluation here):
:func:`bias_terms` lists what the region between the scores MatMul and the Softmax adds to the
scores (candidate terms of a score bias, checked by evaluation in
:func:`~passes.fusions._attention_mask.classify_biased`), :func:`shape_reads` the ``Shape`` nodes
by which those terms read the layer's own heads (:func:`shape_recipe` reads their probed values),
:func:`own_term` a term the fused op could not take; :func:`softcap_reason` and
:func:`disentangled_reason` explain the Softmax regions the walker does not match (Gemma-2's
logit soft-capping, DeBERTa's disentangled attention).
"""

from __future__ import annotations

import numpy as np

import ir

from ._attention_mask import BLOCKED, BiasTerm
from ._attention_match import Candidate
from ..framework.match import const_array, scalar

__all__ = ["bias_terms", "shape_reads", "shape_recipe", "own_term", "softcap_reason", "disentangled_reason"]


# Ops of the region between the scores MatMul and the Softmax (scale, mask, bias and their reshapes).
_REGION_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Reshape"})


def bias_terms(c: Candidate) -> tuple[BiasTerm, ...]:
    """What the scores region may add to the scores: candidate terms of a score bias.

    The region is the nodes on a path from the scores MatMul to the Softmax. A term is an Add
    operand computed outside it (not a scalar: that shifts nothing), or the condition of a Where
    that replaces the scores by a blocking constant. Whether their sum is an ``attention_bias``
    is checked by evaluation (:func:`~passes.fusions._attention_mask.classify_biased`).
    """
    start, end = c.scores_mm.outputs[0], c.softmax.inputs[0]
    hot: dict[int, ir.Node] = {}
    frontier = [start]
    for _ in range(10):  # forward from the scores
        nxt = []
        for v in frontier:
            for u in v.consumers():
                if u.domain == "" and u.op_type in _REGION_OPS and id(u) not in hot and u is not c.softmax:
                    hot[id(u)] = u
                    nxt += [o for o in u.outputs if o is not None]
        frontier = nxt
    back: set[int] = set()
    stack = [end]
    while stack:  # back from the Softmax, through the nodes reached from the scores
        p = stack.pop().producer()
        if p is not None and id(p) in hot and id(p) not in back:
            back.add(id(p))
            stack += [x for x in p.inputs if x is not None]
    made = {id(o) for i in back for o in hot[i].outputs if o is not None} | {id(start)}
    terms: dict[int, BiasTerm] = {}
    for i in back:
        n = hot[i]
        if n.op_type == "Add":
            for x in n.inputs:
                arr = const_array(x) if x is not None else None
                if x is not None and id(x) not in made and (arr is None or arr.size > 1):
                    terms[id(x)] = BiasTerm(x)
        elif n.op_type == "Where" and n.inputs[0] is not None and id(n.inputs[0]) not in made:
            for j in (1, 2):  # Where(cond, fill, scores) or Where(cond, scores, fill)
                fill = scalar(n.inputs[j])
                if fill is not None and fill <= BLOCKED and id(n.inputs[3 - j]) in made:
                    terms[id(n.inputs[0])] = BiasTerm(n.inputs[0], float(fill), blocked_when=j == 1)
    return tuple(sorted(terms.values(), key=lambda t: (t.fill is not None, t.value.name)))


def own_term(c: Candidate, terms: tuple[BiasTerm, ...]) -> BiasTerm | None:
    """A term computed from what the fused op replaces (the layer's output, its present keys or
    values: e.g. a mask sized by ``Shape(present_key)``): the op cannot read it.

    (A term that reads the shape of the layer's query or key heads, as T5 and MPT size their bias,
    keeps those nodes alive instead.)"""
    replaced = {id(v.producer()) for v in c.merge_chain if v.producer() is not None}
    replaced |= {id(p.concat) for p in c.paths.values() if p.concat is not None}
    return next((t for t in terms if _reads_any(t.value, replaced)), None)


def shape_reads(c: Candidate, terms: tuple[BiasTerm, ...]) -> list[ir.Value]:
    """Outputs of the ``Shape`` nodes by which the bias terms read the layer's own values (T5 and MPT
    size their bias by the key heads): rebuilt from the layer input, they let the projections go."""
    layer = {id(n) for n in c.nodes + c.q.nodes + c.k.nodes + c.v.nodes}
    found: dict[int, ir.Value] = {}
    stack, seen = [t.value for t in terms], set()
    while stack:
        p = stack.pop().producer()
        if p is None or id(p) in seen or id(p) in layer:
            continue
        seen.add(id(p))
        src = p.inputs[0] if p.op_type == "Shape" and p.inputs else None
        if src is not None and p.outputs[0] is not None and _reads_any(src, layer):
            found[id(p)] = p.outputs[0]
        else:
            stack += [x for x in p.inputs if x is not None]
    return list(found.values())


def shape_recipe(arrays: list[tuple[int, int, int, np.ndarray]]) -> tuple[str | int, ...] | None:
    """Each element of a probed shape vector as ``"b"``, ``"s"`` or a constant, or ``None``."""
    if not arrays or len({a.shape for *_, a in arrays}) != 1 or arrays[0][3].ndim != 1:
        return None
    recipe: list[str | int] = []
    for i in range(arrays[0][3].size):
        vals = [int(a[i]) for *_, a in arrays]
        if len(set(vals)) == 1:
            recipe.append(vals[0])
        elif all(v == b for (b, _, _, _), v in zip(arrays, vals)):
            recipe.append("b")
        elif all(v == s and p == 0 for (_, s, p, _), v in zip(arrays, vals)):
            recipe.append("s")
        else:
            return None
    return tuple(recipe)


def _reads_any(v: ir.Value, nodes: set[int]) -> bool:
    """True when ``v`` is computed from the output of one of ``nodes``."""
    stack, seen = [v], set()
    while stack:
        p = stack.pop().producer()
        if p is None or id(p) in seen:
            continue
        if id(p) in nodes:
            return True
        seen.add(id(p))
        stack += [x for x in p.inputs if x is not None]
    return False


def softcap_reason(softmax: ir.Node) -> str | None:
    """Why a Softmax fed by ``c·tanh(s/c)`` of a MatMul (Gemma-2's logit soft-capping) is not fused, else ``None``."""
    frontier, tanh = [softmax.inputs[0]], False
    for _ in range(10):
        nxt = []
        for v in frontier:
            p = v.producer() if v is not None else None
            if p is None:
                continue
            if p.op_type == "MatMul" and tanh:
                return ("logit soft-capping (c·tanh(scores/c)) sits between the scores and the Softmax: "
                        "MultiHeadAttention cannot express it (onnxruntime's GroupQueryAttention has a "
                        "softcap, but no key padding mask, see fuse-attention's docs); kept decomposed")
            tanh = tanh or p.op_type == "Tanh"
            if p.op_type in _REGION_OPS or p.op_type == "Tanh":
                nxt += [x for x in p.inputs if x is not None and const_array(x) is None]
        frontier = nxt
    return None


_GATHER_PATH_OPS = _REGION_OPS | {"Transpose", "Squeeze", "Unsqueeze", "Gather", "GatherElements"}


def disentangled_reason(softmax: ir.Node) -> str | None:
    """Why a Softmax whose scores add products gathered by relative position (DeBERTa) is not fused, else ``None``."""
    stack: list[tuple[ir.Value, bool, int]] = [(softmax.inputs[0], False, 0)]
    seen: set[tuple[int, bool]] = set()
    plain = gathered = 0
    while stack:
        v, via_gather, depth = stack.pop()
        p = v.producer()
        if p is None or depth > 12 or (id(p), via_gather) in seen:
            continue
        seen.add((id(p), via_gather))
        if p.op_type == "MatMul" and all(const_array(x) is None for x in p.inputs if x is not None):
            gathered, plain = gathered + via_gather, plain + (not via_gather)
        elif p.op_type in _GATHER_PATH_OPS:
            g = via_gather or p.op_type in ("Gather", "GatherElements")
            stack += [(x, g, depth + 1) for x in p.inputs[:1 if p.op_type.startswith("Gather") else None]
                      if x is not None and const_array(x) is None]
    if plain and gathered:
        return ("the scores add products of the query or key with relative position embeddings, gathered by "
                "relative position (disentangled attention, DeBERTa): a bias that depends on the query/key values "
                "is no attention_bias of MultiHeadAttention; kept decomposed")
    return None
