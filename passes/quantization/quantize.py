"""``quantize``: per-op int8 quantization of weights under an accuracy budget.

What it does, in order:

1. **Candidates** come from the target's :class:`~targets.QuantPolicy`: ``MatMul`` and ``Gemm`` with a
   constant 2-D float weight, and ``com.microsoft::Attention`` (packed ``[H, 3H]`` QKV weight).
   Names or op types in ``options["exclude"]`` are skipped.
2. **Calibration** inputs (see :mod:`passes.quantization.calibration`): an ``.npz``, real text through the
   model's tokenizer, or generated inputs (with a warning).
3. **Remedies** for activation outliers are tried on the fully quantized model and the best one is
   kept: plain per-channel weights, and SmoothQuant equalization of the activations read from a
   LayerNormalization-like op (``s = max|x|^a / max|w|^(1-a)``; folded into gamma/beta when the
   quantized ops are the only readers, else a ``Mul`` by ``1/s`` in front of them), and, for
   MatMul/Gemm activations not smoothed (e.g. GELU outputs), LLM.int8()-style outlier channels: the
   few channels with a calibration ``max|x|`` far above the rest are zeroed in the quantized path
   (``Mul`` by a 0/1 mask) and computed in float (``Gather`` + small ``MatMul``, then ``Add``).
4. **Sensitivity**: each candidate is quantized alone and the model scored against the float one
   (:mod:`passes.quantization.sensitivity`). Candidates are then quantized in order of accuracy lost per
   multiply-add moved to int8 (``K*N``, a proxy for the time saved)
   while the combined model (re-measured, not summed) keeps the worst sample's cosine at or above
   ``min_cosine``; the others stay float. If not even one op fits, the model stays float and a note
   says so.
5. **Rewrite** by ``policy.format``:

   * ``integer-ops``: ``com.microsoft::DynamicQuantizeMatMul(A, B_q, b_scale, b_zero_point, bias)``
     (a following bias ``Add`` is folded in); when one activation feeds several quantized ops, one
     ``DynamicQuantizeLinear`` feeds ``MatMulIntegerToFloat`` / ``QAttention`` nodes;
   * ``qdq``: ``DynamicQuantizeLinear -> DequantizeLinear`` on the activation and
     ``DequantizeLinear(B_q, scale, zero_point, axis)`` on the weight, around the float ``MatMul``:
     standard ONNX any runtime runs.

The per-op table goes to ``ctx.options["quantize_report"]`` (a list of dicts); counters go to the
pass result's stats.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np

import ir

from ..framework.base import Pass, PassContext, PassError, PassResult
from ..framework.numerics import model_bytes_or_path, session
from .calibration import calibration_batches
from .quant_math import outlier_channels, quantize_weight, smooth_factors
from .sensitivity import Evaluator, Score
from ..framework.registry import register_pass
from ..framework.rewriter import Rewriter

__all__ = ["QuantizePass", "find_candidates", "Candidate", "Plan", "apply_plan", "build_switch_model"]

_MS = "com.microsoft"
#: Producers whose output is a normalized activation SmoothQuant may rescale: op -> (gamma, beta) inputs.
_NORM_OPS: dict[tuple[str, str], tuple[int, int | None]] = {
    ("", "LayerNormalization"): (1, 2),
    (_MS, "LayerNormalization"): (1, 2),
    (_MS, "SkipLayerNormalization"): (2, 3),
    (_MS, "SimplifiedLayerNormalization"): (1, None),
    (_MS, "SkipSimplifiedLayerNormalization"): (2, None),
    (_MS, "EmbedLayerNormalization"): (5, 6),
}
#: Attention attributes QAttention understands; an Attention with any other one is left float.
_QATTENTION_ATTRS = {"num_heads", "unidirectional", "scale", "mask_filter_value", "do_rotary",
                     "past_present_share_buffer"}


def _dom(node: ir.Node) -> str:
    return "" if node.domain == "ai.onnx" else node.domain


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value.numpy()


def _is_float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (None, ir.DataType.FLOAT)


# --------------------------------------------------------------------------------------------- #
# Candidates
# --------------------------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Candidate:
    """One op that may be quantized.

    Attributes:
        index: position of the node in the graph's order (stable across copies of the model).
        name: the node's label, for reports.
        op: ``MatMul``, ``Gemm`` or ``Attention``.
        activation: name of the activation value it reads (input 0).
        weight_shape: ``[K, N]`` of the effective weight.
    """

    index: int
    name: str
    op: str
    activation: str
    weight_shape: tuple[int, int]


def _bias_add(node: ir.Node, n: int) -> ir.Node | None:
    """The ``Add`` of a constant ``[N]`` bias that alone reads a MatMul's output, if any."""
    out = node.outputs[0]
    if out is None or out.is_graph_output() or len(out.uses()) != 1:
        return None
    add, idx = out.uses()[0]
    if add.op_type != "Add" or _dom(add) != "" or len(add.inputs) != 2:
        return None
    b = _const(add.inputs[1 - idx])
    if b is None or b.dtype != np.float32 or b.shape not in ((n,), (1, n)):
        return None
    return add


def _weight_of(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The effective ``[K, N]`` float weight and ``[N]`` bias of a MatMul/Gemm/Attention, or None."""
    op = node.op_type
    if op == "MatMul":
        w = _const(node.inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            return None
        return w, None
    if op == "Gemm":
        a = {k: v.value for k, v in node.attributes.items()}
        if a.get("transA", 0) or len(node.inputs) < 2:
            return None
        w = _const(node.inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            return None
        w = (w.T if a.get("transB", 0) else w) * np.float32(a.get("alpha", 1.0))
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = _const(node.inputs[2])
            if c is None or c.dtype != np.float32 or c.size not in (1, w.shape[1]) or c.ndim > 2 or (
                c.ndim == 2 and c.shape[0] != 1
            ):
                return None
            bias = np.broadcast_to(c.reshape(-1), (w.shape[1],)) * np.float32(a.get("beta", 1.0))
        return w.astype(np.float32), None if bias is None else bias.astype(np.float32)
    if op == "Attention":
        if set(node.attributes) - _QATTENTION_ATTRS or "num_heads" not in node.attributes:
            return None
        if any(v is not None for v in node.inputs[4:]):  # past, attention_bias, past_sequence_length
            return None
        if len(node.outputs) > 1 and node.outputs[1] is not None and (
            node.outputs[1].has_uses() or node.outputs[1].is_graph_output()
        ):
            return None
        w, b = _const(node.inputs[1]), _const(node.inputs[2]) if len(node.inputs) > 2 else None
        if w is None or b is None or w.dtype != np.float32 or w.ndim != 2 or b.shape != (w.shape[1],):
            return None
        return w, b
    return None


def find_candidates(model: ir.Model, ops: tuple[str, ...], exclude: set[str] = frozenset()) -> list[Candidate]:
    """The ops of the main graph the policy allows and whose weights are constant 2-D float.

    Args:
        model: the model.
        ops: op types to consider (``MatMul``, ``Gemm``, ``Attention``).
        exclude: node names or op types never to quantize.
    """
    out = []
    for index, node in enumerate(model.graph):
        op, dom = node.op_type, _dom(node)
        if op not in ops or (op == "Attention") != (dom == _MS) or (op != "Attention" and dom != ""):
            continue
        if op in exclude or node.name in exclude or not node.inputs or not _is_float32(node.inputs[0]):
            continue
        if node.inputs[0] is None or _const(node.inputs[0]) is not None:
            continue
        wb = _weight_of(node)
        if wb is None:
            continue
        out.append(Candidate(index, node.label(), op, node.inputs[0].name, tuple(wb[0].shape)))
    return out


# --------------------------------------------------------------------------------------------- #
# Rewriting
# --------------------------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Plan:
    """What to quantize and how.

    Attributes:
        chosen: indices (:attr:`Candidate.index`) of the candidates to quantize.
        per_channel: per-output-channel weight scales.
        reduce_range: 7-bit weights.
        signed: int8 (else uint8) weights.
        format: ``integer-ops`` or ``qdq``.
        smooth: SmoothQuant factors by activation name (applied to the chosen readers only).
        outliers: input channels computed in float, by activation name (LLM.int8()-style: the
            quantized path reads the activation with those channels zeroed, and a small float
            ``MatMul`` of the gathered channels with the matching weight rows is added back).
    """

    chosen: frozenset[int]
    per_channel: bool
    reduce_range: bool
    signed: bool
    format: str
    smooth: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    outliers: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _outlier_inputs(graph: ir.Graph, rw: Rewriter, x: ir.Value, idx: np.ndarray, k: int, first: ir.Node, base: str
                    ) -> tuple[ir.Value, ir.Value]:
    """``(x * mask, Gather(x, idx, axis=-1))``: the activation without its outlier channels, and those channels.

    ``k`` is the channel count (the weight's ``K``).
    """
    mask = np.ones(k, np.float32)
    mask[idx] = 0.0
    gather = rw.make("Gather", [x, rw.constant(graph, idx.astype(np.int64), name=f"{base}_outlier_idx")],
                     {"axis": -1}, before=first, name=f"{base}_outliers", output_names=[f"{base}_outliers"],
                     types=[ir.TensorType(ir.DataType.FLOAT, None)])
    masked = rw.make("Mul", [x, rw.constant(graph, mask, name=f"{base}_inlier_mask")], before=first,
                     name=f"{base}_inliers", output_names=[f"{base}_inliers"], types=[x.type])
    return masked.outputs[0], gather.outputs[0]


def _smooth(graph: ir.Graph, rw: Rewriter, x: ir.Value, readers: list[ir.Node], s: np.ndarray) -> ir.Value:
    """Divide activation ``x`` by ``s`` for ``readers``; returns the value they should read.

    Folds ``1/s`` into the normalization's gamma and beta when the readers are all of ``x``'s
    readers, else inserts ``Mul(x, 1/s)``.
    """
    prod = x.producer()
    key = (_dom(prod), prod.op_type) if prod is not None else None
    if (
        prod is not None and key in _NORM_OPS and x.index() == 0 and not x.is_graph_output()
        and {n for n, _ in x.uses()} <= set(readers)
    ):
        gi, bi = _NORM_OPS[key]
        gamma = _const(prod.inputs[gi]) if gi < len(prod.inputs) else None
        beta = _const(prod.inputs[bi]) if bi is not None and bi < len(prod.inputs) else None
        ok = gamma is not None and gamma.shape == s.shape and (bi is None or bi >= len(prod.inputs) or prod.inputs[bi] is None or (beta is not None and beta.shape == s.shape))
        if ok:
            rw.replace_input(prod, gi, rw.constant(graph, (gamma / s).astype(np.float32), name=f"{x.name}_smooth_gamma"))
            if beta is not None:
                rw.replace_input(prod, bi, rw.constant(graph, (beta / s).astype(np.float32), name=f"{x.name}_smooth_beta"))
            return x
    inv = rw.constant(graph, (1.0 / s).astype(np.float32), name=f"{x.name}_smooth_inv")
    first = min(readers, key=lambda n: _position(graph, n))
    mul = rw.make("Mul", [x, inv], before=first, name=f"{x.name}_smooth", output_names=[f"{x.name}_smoothed"],
                  types=[x.type])
    return mul.outputs[0]


def _position(graph: ir.Graph, node: ir.Node) -> int:
    for i, n in enumerate(graph):
        if n is node:
            return i
    return -1


def apply_plan(model: ir.Model, candidates: list[Candidate], plan: Plan) -> Rewriter:
    """Quantize the chosen candidates of ``model`` in place.

    Returns:
        The rewriter that made the changes (its stats count the quantized ops).
    """
    rw = Rewriter()
    graph = model.graph
    nodes = list(graph)
    chosen = [(c, nodes[c.index]) for c in candidates if c.index in plan.chosen]
    if not chosen:
        return rw
    for c, node in chosen:
        if node.op_type != c.op or node.inputs[0] is None or node.inputs[0].name != c.activation:
            raise PassError(f"quantize: candidate {c.name} no longer matches node {node.label()}")
    if plan.format == "integer-ops":
        rw.import_opset(model, _MS)
    # Group the chosen ops by the activation they read; smoothing may give a group a new activation.
    groups: dict[str, list[tuple[Candidate, ir.Node]]] = {}
    for c, node in chosen:
        groups.setdefault(c.activation, []).append((c, node))
    for act, members in groups.items():
        x = members[0][1].inputs[0]
        assert x is not None
        weights = {id(node): _weight_of(node) for _, node in members}
        s = plan.smooth.get(act)
        if s is not None:
            x = _smooth(graph, rw, x, [n for _, n in members], s)
            weights = {k: (w * s[:, None], b) for k, (w, b) in weights.items()}  # type: ignore[misc]
        first = min((n for _, n in members), key=lambda n: _position(graph, n))
        idx = plan.outliers.get(act)
        outlier: tuple[ir.Value, np.ndarray] | None = None
        if idx is not None and len(idx) and not any(c.op == "Attention" for c, _ in members):
            x, gathered = _outlier_inputs(graph, rw, x, idx, members[0][0].weight_shape[0], first, act)
            outlier = (gathered, idx)
            rw.count("outlier channels", len(idx))
        shared: tuple[ir.Value, ...] | None = None
        if plan.format == "qdq":
            dql = rw.make("DynamicQuantizeLinear", [x], before=first, name=f"{act}_quant", num_outputs=3,
                          output_names=[f"{act}_q", f"{act}_scale", f"{act}_zero_point"])
            dq = rw.make("DequantizeLinear", list(dql.outputs), before=first, name=f"{act}_dequant",
                         output_names=[f"{act}_dq"], types=[x.type])
            shared = (dq.outputs[0],)
        elif len(members) > 1 or any(c.op == "Attention" for c, _ in members):
            dql = rw.make("DynamicQuantizeLinear", [x], before=first, name=f"{act}_quant", num_outputs=3,
                          output_names=[f"{act}_q", f"{act}_scale", f"{act}_zero_point"])
            shared = tuple(dql.outputs)  # type: ignore[arg-type]
        for c, node in members:
            w, b = weights[id(node)]  # type: ignore[misc]
            _rewrite_one(graph, rw, c, node, x, w, b, shared, plan, outlier)
    return rw


def _rewrite_one(
    graph: ir.Graph, rw: Rewriter, c: Candidate, node: ir.Node, x: ir.Value, w: np.ndarray,
    bias: np.ndarray | None, shared: tuple[ir.Value, ...] | None, plan: Plan,
    outlier: tuple[ir.Value, np.ndarray] | None = None,
) -> None:
    old_weight = node.inputs[1]
    old_bias = [v for v in node.inputs[2:3] if v is not None]
    base = node.name or c.activation
    n = w.shape[1]
    if plan.format == "qdq":
        assert shared is not None
        transposed = c.op == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].value
        w_store = w.T if transposed else w
        if c.op == "Gemm":  # alpha was folded into w; the stored B carries it now
            rw.remove_attr(node, "alpha")
        qw = quantize_weight(w_store, per_channel=plan.per_channel, signed=plan.signed,
                             reduce_range=plan.reduce_range, axis=0 if transposed else 1)
        ins = [rw.constant(graph, qw.q, name=f"{base}_w_q"), rw.constant(graph, qw.scale, name=f"{base}_w_scale"),
               rw.constant(graph, qw.zero_point, name=f"{base}_w_zero_point")]
        attrs = {"axis": qw.axis} if qw.axis is not None else {}
        dq = rw.make("DequantizeLinear", ins, attrs, before=node, name=f"{base}_w_dequant",
                     output_names=[f"{base}_w_dq"], types=[ir.TensorType(ir.DataType.FLOAT, qw.q.shape)])
        rw.replace_input(node, 0, shared[0])
        rw.replace_input(node, 1, dq.outputs[0])
        if outlier is not None:
            y = node.outputs[0]
            assert y is not None
            part = _outlier_matmul(graph, rw, outlier, w, base, after=node)
            add = rw.make("Add", [y, part], after=part.producer(), name=f"{base}_add_outliers",
                          output_names=[f"{base}_with_outliers"], types=[y.type])
            for user, i in list(y.uses()):
                if user is not add:
                    rw.replace_input(user, i, add.outputs[0])
            if y.is_graph_output():
                y.replace_all_uses_with(add.outputs[0])
                add.replace_input(0, y)
        rw.count(f"quantized {c.op}")
        _drop_unused(graph, rw, old_weight)
        return
    qw = quantize_weight(w, per_channel=plan.per_channel, signed=plan.signed, reduce_range=plan.reduce_range, axis=1)
    wq = rw.constant(graph, qw.q, name=f"{base}_w_q")
    ws = rw.constant(graph, qw.scale, name=f"{base}_w_scale")
    wz = rw.constant(graph, qw.zero_point, name=f"{base}_w_zero_point")
    out_type = node.outputs[0].type if node.outputs[0] is not None else None
    if c.op == "Attention":
        assert shared is not None
        xq, xs, xz = shared
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        attrs = {k: a for k, a in node.attributes.items() if k in _QATTENTION_ATTRS}
        b = rw.constant(graph, bias.astype(np.float32), name=f"{base}_bias")  # type: ignore[union-attr]
        new = rw.make("QAttention", [xq, wq, b, xs, ws, mask, xz, wz], dict(attrs),
                      before=node, domain=_MS, name=f"{base}_quant", output_names=[f"{base}_out"], types=[out_type])
        rw.replace_all_uses_with(node.outputs[0], new.outputs[0])
        rw.erase(node)
        rw.count("quantized Attention")
        for v in [old_weight, *old_bias]:
            _drop_unused(graph, rw, v)
        return
    # MatMul / Gemm: fold the following bias Add (or Gemm's C) into the quantized op.
    replaced, erase = node.outputs[0], [node]
    if bias is None and c.op == "MatMul":
        add = _bias_add(node, n)
        if add is not None:
            bias = _const(add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]).reshape(-1)  # type: ignore[union-attr]
            replaced, erase = add.outputs[0], [add, node]
            old_bias = [v for v in add.inputs if v is not None and v.is_initializer()]
    b = rw.constant(graph, bias.astype(np.float32), name=f"{base}_bias") if bias is not None else None
    if shared is None:
        new = rw.make("DynamicQuantizeMatMul", [x, wq, ws, wz, b], before=node, domain=_MS, name=f"{base}_quant",
                      output_names=[f"{base}_out"], types=[replaced.type])
    else:
        xq, xs, xz = shared
        new = rw.make("MatMulIntegerToFloat", [xq, wq, xs, ws, xz, wz, b], before=node, domain=_MS,
                      name=f"{base}_quant", output_names=[f"{base}_out"], types=[replaced.type])
    result = new.outputs[0]
    if outlier is not None:
        part = _outlier_matmul(graph, rw, outlier, w, base, before=node)
        result = rw.make("Add", [result, part], before=node, name=f"{base}_add_outliers",
                         output_names=[f"{base}_with_outliers"], types=[replaced.type]).outputs[0]
    rw.replace_all_uses_with(replaced, result)
    rw.erase(erase)
    rw.count(f"quantized {c.op}")
    for v in [old_weight, *old_bias]:
        _drop_unused(graph, rw, v)


def _outlier_matmul(graph: ir.Graph, rw: Rewriter, outlier: tuple[ir.Value, np.ndarray], w: np.ndarray, base: str,
                    *, before: ir.Node | None = None, after: ir.Node | None = None) -> ir.Value:
    """The float product of the gathered outlier channels with their weight rows."""
    gathered, idx = outlier
    rows = rw.constant(graph, np.ascontiguousarray(w[idx, :], np.float32), name=f"{base}_outlier_w")
    mm = rw.make("MatMul", [gathered, rows], before=before, after=after, name=f"{base}_outlier_matmul",
                 output_names=[f"{base}_outlier_part"], types=[ir.TensorType(ir.DataType.FLOAT, None)])
    return mm.outputs[0]


def _drop_unused(graph: ir.Graph, rw: Rewriter, value: ir.Value | None) -> None:
    if value is not None and value.is_initializer() and not value.has_uses() and not value.is_graph_output() \
            and not value.is_graph_input():
        rw.remove_initializer(graph, value.name)


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_onnx(ir.to_onnx(model))


def build_switch_model(model: ir.Model, candidates: list[Candidate], plan: Plan) -> tuple[ir.Model, dict[int, str]]:
    """A copy of ``model`` where every candidate can be switched between float and int8 at run time.

    Each candidate's output ``y`` becomes ``y + flag * (y_int8 - y)`` with ``flag`` a scalar graph
    input: one onnxruntime session then measures any subset of quantized ops, instead of one
    session per subset. ``flag = 0`` gives the float output exactly; the int8 path is the same
    arithmetic :func:`apply_plan` emits (one quantizer per op instead of a shared one, which
    computes the same numbers).

    Returns:
        The copy, and the flag input's name for each candidate index.
    """
    m = _copy(model)
    graph = m.graph
    rw = Rewriter()
    if plan.format == "integer-ops":
        rw.import_opset(m, _MS)
    nodes = list(graph)
    flags: dict[int, str] = {}
    smoothed: dict[str, ir.Value] = {}
    scalar = ir.TensorType(ir.DataType.FLOAT, ())
    for c in candidates:
        node = nodes[c.index]
        x, y = node.inputs[0], node.outputs[0]
        assert x is not None and y is not None
        w, bias = _weight_of(node)  # type: ignore[misc]
        s = plan.smooth.get(c.activation)
        if s is not None:
            if c.activation not in smoothed:
                inv = rw.constant(graph, (1.0 / s).astype(np.float32), name=f"{c.activation}_smooth_inv")
                smoothed[c.activation] = rw.make("Mul", [x, inv], before=node, types=[x.type]).outputs[0]
            x = smoothed[c.activation]
            w = w * s[:, None]
        base = f"switch{c.index}"
        idx = plan.outliers.get(c.activation)
        outlier: tuple[ir.Value, np.ndarray] | None = None
        if idx is not None and len(idx) and c.op != "Attention":
            x, gathered = _outlier_inputs(graph, rw, x, idx, c.weight_shape[0], node, base)
            outlier = (gathered, idx)
        after = node
        if plan.format == "qdq":
            qw = quantize_weight(w, per_channel=plan.per_channel, signed=plan.signed, reduce_range=plan.reduce_range)
            dql = rw.make("DynamicQuantizeLinear", [x], after=after, num_outputs=3)
            dqx = rw.make("DequantizeLinear", list(dql.outputs), after=dql)
            attrs = {"axis": 1} if qw.axis is not None else {}
            dqw = rw.make("DequantizeLinear", [rw.constant(graph, qw.q, name=f"{base}_w_q"),
                                               rw.constant(graph, qw.scale, name=f"{base}_w_scale"),
                                               rw.constant(graph, qw.zero_point, name=f"{base}_w_zp")], attrs, after=dqx)
            yq = rw.make("MatMul", [dqx.outputs[0], dqw.outputs[0]], after=dqw)
            last = yq
            if bias is not None:
                last = rw.make("Add", [yq.outputs[0], rw.constant(graph, bias, name=f"{base}_bias")], after=yq)
        else:
            qw = quantize_weight(w, per_channel=plan.per_channel, signed=plan.signed, reduce_range=plan.reduce_range)
            wq = rw.constant(graph, qw.q, name=f"{base}_w_q")
            ws = rw.constant(graph, qw.scale, name=f"{base}_w_scale")
            wz = rw.constant(graph, qw.zero_point, name=f"{base}_w_zp")
            b = rw.constant(graph, bias, name=f"{base}_bias") if bias is not None else None
            if c.op == "Attention":
                dql = rw.make("DynamicQuantizeLinear", [x], after=after, num_outputs=3)
                xq, xs, xz = dql.outputs
                attrs = {k: a for k, a in node.attributes.items() if k in _QATTENTION_ATTRS}
                mask = node.inputs[3] if len(node.inputs) > 3 else None
                last = rw.make("QAttention", [xq, wq, b, xs, ws, mask, xz, wz], dict(attrs), after=dql, domain=_MS)
            else:
                last = rw.make("DynamicQuantizeMatMul", [x, wq, ws, wz, b], after=after, domain=_MS)
        if outlier is not None:
            part = _outlier_matmul(graph, rw, outlier, w, base, after=last)
            last = rw.make("Add", [last.outputs[0], part], after=part.producer())
        yq_out = last.outputs[0]
        flag = ir.Value(graph.unique_name(f"quant_flag_{c.index}"), scalar)
        graph.add_input(flag)
        flags[c.index] = flag.name
        diff = rw.make("Sub", [yq_out, y], after=last)
        scaled = rw.make("Mul", [diff.outputs[0], flag], after=diff)
        mixed = rw.make("Add", [y, scaled.outputs[0]], after=scaled, types=[y.type])
        for user, idx in y.uses():
            if user is not diff and user is not mixed:
                user.replace_input(idx, mixed.outputs[0])
        if y.is_graph_output():
            y.replace_all_uses_with(mixed.outputs[0])  # graph output only: the readers moved already
            diff.replace_input(1, y)
            mixed.replace_input(0, y)
    graph.sort()
    return m, flags


# --------------------------------------------------------------------------------------------- #
# The pass
# --------------------------------------------------------------------------------------------- #


@register_pass
@dataclass(frozen=True)
class QuantizePass(Pass):
    """Quantize MatMul/Gemm/Attention weights to int8 where the accuracy budget allows.

    Attributes:
        min_cosine: the budget: the worst calibration sample's cosine to the float model
            (``ctx.options["min_cosine"]`` overrides it).
        per_channel: per-output-channel weight scales; ``None`` follows the target's policy.
        reduce_range: 7-bit weights; ``None`` follows the target's policy.
        max_calibration: calibration samples to use at most.
        smooth: SmoothQuant: ``auto`` (try it, keep it when it measures better), ``on``, ``off``.
        smooth_alphas: migration strengths ``a`` tried.
        outliers: LLM.int8()-style outlier channels kept float for MatMul/Gemm activations not
            smoothed: ``auto`` (try it, keep it when it measures better), ``on``, ``off``.
        outlier_threshold: a channel is an outlier when its calibration ``max|x|`` exceeds this
            many times the level of the channels past the budget (see
            :func:`passes.quantization.quant_math.outlier_channels`).
        outlier_fraction: the largest fraction of an activation's channels kept float.
        sensitivity: measure each op and keep the sensitive ones float (``False``: quantize every
            candidate without measuring anything).
        threads: onnxruntime threads while measuring.
    """

    name: ClassVar[str] = "quantize"
    summary: ClassVar[str] = "int8 weights per op under an accuracy budget (dynamic activations)"

    min_cosine: float = 0.999
    # Optional[...] rather than ``bool | None``: the pipeline parser reads typing.Union options.
    per_channel: Optional[bool] = None  # noqa: UP007
    reduce_range: Optional[bool] = None  # noqa: UP007
    max_calibration: int = 128
    smooth: str = "auto"
    smooth_alphas: tuple[float, ...] = (0.5, 0.7)
    outliers: str = "auto"
    outlier_threshold: float = 2.0
    outlier_fraction: float = 0.02
    sensitivity: bool = True
    threads: int = 2

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Choose the ops to quantize under the budget, then rewrite them."""
        from targets import QuantPolicy

        policy = ctx.target.quantization if ctx.target is not None else QuantPolicy()
        if policy.activations != "dynamic":
            raise PassError(f"quantize: activations={policy.activations!r} is not supported (only dynamic)")
        if policy.format not in ("integer-ops", "qdq"):
            raise PassError(f"quantize: unknown quantization format {policy.format!r}")
        if self.smooth not in ("auto", "on", "off"):
            raise PassError(f"quantize: smooth must be auto, on or off, not {self.smooth!r}")
        if self.outliers not in ("auto", "on", "off"):
            raise PassError(f"quantize: outliers must be auto, on or off, not {self.outliers!r}")
        ops = tuple(o for o in policy.ops if policy.format == "integer-ops" or o != "Attention")
        exclude = set(ctx.options.get("exclude") or ())
        min_cos = float(ctx.options.get("min_cosine", self.min_cosine))
        report: list[dict[str, Any]] = []
        ctx.options["quantize_report"] = report
        candidates = find_candidates(model, ops, exclude)
        if not candidates:
            return PassResult(False)
        base = Plan(
            frozenset(c.index for c in candidates),
            per_channel=policy.per_channel if self.per_channel is None else self.per_channel,
            reduce_range=policy.reduce_range if self.reduce_range is None else self.reduce_range,
            signed=policy.weight_signed,
            format=policy.format,
        )
        if not self.sensitivity:
            rw = apply_plan(model, candidates, base)
            for c in candidates:
                report.append({"name": c.name, "op": c.op, "shape": list(c.weight_shape), "decision": "quantized",
                               "error": None, "smoothed": False})
            return rw.result()
        plan, scores = self._decide(model, ctx, candidates, base, min_cos)
        for c in candidates:
            err = scores.get(c.index)
            report.append({
                "name": c.name, "op": c.op, "shape": list(c.weight_shape),
                "decision": "quantized" if c.index in plan.chosen else "kept float",
                "error": None if err is None else round(1.0 - err.worst, 7),
                "smoothed": c.activation in plan.smooth and c.index in plan.chosen,
            })
        if not plan.chosen:
            return PassResult(False, stats=Counter({"kept float": len(candidates)}))
        rw = apply_plan(model, candidates, plan)
        rw.count("kept float", len(candidates) - len(plan.chosen))
        smoothed = {c.activation for c in candidates if c.index in plan.chosen and c.activation in plan.smooth}
        if smoothed:
            rw.count("smoothed activations", len(smoothed))
        return rw.result()

    # -- decisions ------------------------------------------------------------------------
    def _decide(
        self, model: ir.Model, ctx: PassContext, candidates: list[Candidate], base: Plan, min_cos: float
    ) -> tuple[Plan, dict[int, Score]]:
        t0 = time.perf_counter()
        source, _ = model_bytes_or_path(model)
        meta = session(source, 1).get_inputs()
        calib = calibration_batches(model, meta, ctx.options, limit=self.max_calibration)
        if calib.generated:
            ctx.note(self.name, "calibration", "no --calibration or --tokenizer/--texts given: deciding on generated "
                     "inputs, which may not show the activation ranges of real data")
        ctx.report_progress(f"quantize: {len(candidates)} candidates, calibrating on {calib.source}")
        ev = Evaluator(source, calib.batches, threads=self.threads)
        del source

        # 1. remedies for activation outliers, each measured on the fully quantized model
        variants = self._variants(model, ev, candidates, base)
        all_on = {c.index: 1.0 for c in candidates}
        best: tuple[str, Plan, Any, dict[int, str], Score] | None = None
        for vname, vplan in variants:
            switch, flags = build_switch_model(model, candidates, vplan)
            sess = ev.session(model_bytes_or_path(switch)[0])
            del switch
            s = ev.score_session(sess, _flag_feeds(flags, all_on))
            ctx.report_progress(f"quantize: all {len(candidates)} ops int8 with {vname}: {s}")
            if best is None or s.worst > best[4].worst:
                best = (vname, vplan, sess, flags, s)
        assert best is not None
        best_name, plan, sess, flags, all_score = best

        def score(chosen: set[int]) -> Score:
            return ev.score_session(sess, _flag_feeds(flags, {i: 1.0 for i in chosen}))

        scores: dict[int, Score] = {}
        chosen: list[int]
        if all_score.worst >= min_cos:
            chosen = [c.index for c in candidates]
        else:
            # 2. sensitivity of each op alone
            for i, c in enumerate(candidates):
                scores[c.index] = score({c.index})
                if i % 12 == 11:
                    ctx.report_progress(f"quantize: measured {i + 1}/{len(candidates)} ops alone")
            # Time-aware: the least accuracy lost per multiply-add moved to int8 goes first (the
            # int8 speed-up of an op is about proportional to its weight's K*N per token).
            order = sorted(candidates, key=lambda c: (max(1.0 - scores[c.index].worst, 1e-9) / _macs(c),
                                                      -scores[c.index].worst))
            fits = [c for c in order if scores[c.index].worst >= min_cos]
            # 3. the longest prefix of the least sensitive ops that fits (bisection), then greedy additions
            lo, hi = 0, len(fits)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if score({c.index for c in fits[:mid]}).worst >= min_cos:
                    lo = mid
                else:
                    hi = mid - 1
            chosen = [c.index for c in fits[:lo]]
            for c in fits[lo + 1 :]:
                if score({*chosen, c.index}).worst >= min_cos:
                    chosen.append(c.index)
        # 4. the real rewrite, measured once more (the switch model is a faithful stand-in, but check)
        final: Score | None = None
        while chosen:
            trial = _copy(model)
            apply_plan(trial, candidates, dataclasses.replace(plan, chosen=frozenset(chosen)))
            final = ev.score(model_bytes_or_path(trial)[0])
            if final.worst >= min_cos:
                break
            worst = min(chosen, key=lambda i: scores[i].worst if i in scores else 1.0)
            chosen.remove(worst)
            final = None
        seconds = time.perf_counter() - t0
        if not chosen:
            least = max((s.worst for s in scores.values()), default=all_score.worst)
            ctx.note(self.name, "model", f"the budget min_cosine={min_cos} cannot be met: the least sensitive op alone "
                     f"gives worst cosine {least:.6f} on {calib.source}; the model is left in float")
            return dataclasses.replace(plan, chosen=frozenset()), scores
        ctx.note(self.name, "model", f"{len(chosen)}/{len(candidates)} ops int8 ({best_name}), "
                 f"{len(candidates) - len(chosen)} kept float; {final} (budget {min_cos}) on {calib.source}; "
                 f"{ev.stats.evaluations} measurements in {seconds:.1f} s")
        return dataclasses.replace(plan, chosen=frozenset(chosen)), scores


    def _variants(self, model: ir.Model, ev: Evaluator, candidates: list[Candidate], base: Plan
                  ) -> list[tuple[str, Plan]]:
        """The remedies to try: SmoothQuant on normalized activations, outlier channels on the others."""
        kind = "per-channel" if base.per_channel else "per-tensor"
        smooth_groups = _smooth_groups(model, candidates) if self.smooth != "off" else {}
        outlier_acts = sorted({c.activation for c in candidates if c.op != "Attention"}) \
            if self.outliers != "off" and self.outlier_threshold > 0 else []
        # an activation read by an Attention keeps its quantizer whole (QAttention reads it directly)
        shared_with_attention = {c.activation for c in candidates if c.op == "Attention"}
        # (graph inputs are left out: the probe model reads intermediate values only)
        produced = {o.name for n in model.graph for o in n.outputs if o is not None}
        outlier_acts = [a for a in outlier_acts if a not in shared_with_attention and a in produced]
        absmax = _activation_absmax(model, ev, sorted(set(smooth_groups) | set(outlier_acts)))
        nodes = list(model.graph)

        def outliers(skip: set[str]) -> dict[str, np.ndarray]:
            out = {}
            for act in outlier_acts:
                if act in skip:
                    continue
                idx = outlier_channels(absmax[act], self.outlier_threshold, self.outlier_fraction)
                if len(idx):
                    out[act] = idx
            return out

        plain = outliers(set())
        variants: list[tuple[str, Plan]] = []
        if self.smooth != "on":
            if self.outliers != "on" or not plain:
                variants.append((kind, base))
            if plain:
                n = sum(len(v) for v in plain.values())
                variants.append((f"{kind} + {n} outlier channels", dataclasses.replace(base, outliers=plain)))
        for alpha in self.smooth_alphas if smooth_groups else ():
            factors = {}
            for act, members in smooth_groups.items():
                w_absmax = np.max([np.abs(_weight_of(nodes[c.index])[0]).max(axis=1)  # type: ignore[index]
                                   for c in members], axis=0)
                factors[act] = smooth_factors(absmax[act], w_absmax, alpha)
            rest = outliers(set(factors))
            name = f"{kind} + SmoothQuant a={alpha}"
            if self.outliers != "on" or not rest:
                variants.append((name, dataclasses.replace(base, smooth=factors)))
            if rest:
                n = sum(len(v) for v in rest.values())
                variants.append((f"{name} + {n} outlier channels", dataclasses.replace(base, smooth=factors, outliers=rest)))
        return variants or [(kind, base)]


def _macs(c: Candidate) -> float:
    """Multiply-adds per token of a candidate's weight product."""
    return float(c.weight_shape[0] * c.weight_shape[1])


def _flag_feeds(flags: dict[int, str], on: dict[int, float]) -> dict[str, np.ndarray]:
    return {name: np.array(on.get(i, 0.0), np.float32) for i, name in flags.items()}


def _smooth_groups(model: ir.Model, candidates: list[Candidate]) -> dict[str, list[Candidate]]:
    """Candidates by activation, for activations produced by a LayerNormalization-like op."""
    nodes = list(model.graph)
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        x = nodes[c.index].inputs[0]
        p = x.producer() if x is not None else None
        if p is not None and (_dom(p), p.op_type) in _NORM_OPS and x.index() == 0:  # type: ignore[union-attr]
            groups.setdefault(c.activation, []).append(c)
    return groups


def _activation_absmax(model: ir.Model, ev: Evaluator, names: list[str]) -> dict[str, np.ndarray]:
    m = _copy(model)
    by_name = {o.name: o for n in m.graph for o in n.outputs if o is not None}
    present = {v.name for v in m.graph.outputs}
    m.graph.outputs.extend(by_name[n] for n in names if n not in present)
    return ev.activation_absmax(model_bytes_or_path(m)[0], names)
