"""The rewrites of ``quantize``: a :class:`Plan` applied to the chosen candidates, and the switch model.

:func:`apply_plan` writes the chosen ops in the policy's format (``integer-ops``: contrib
``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` / ``QAttention``; ``qdq``: standard
``DynamicQuantizeLinear`` / ``DequantizeLinear`` around the float ``MatMul``), with the plan's
SmoothQuant factors and outlier channels, and the plan's ``nbits`` ops (kept out of the int8 set
by the budget) as 8-bit block-wise weight-only ``MatMulNBits`` (:mod:`passes.quantization.weight_only`'s
rewrite, ``accuracy_level=4``: activations quantized per block of 32, not per tensor).
:func:`int8_form` writes one op's int8 form beside it, for the switch and probe models that measure
every assignment of forms (:mod:`passes.quantization.forms`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

import ir

from ._candidates import MS, NORM_OPS, QATTENTION_ATTRS, Candidate, initializer_array, weight_of
from .quant_math import quantize_weight
from ..framework.base import PassError
from ..framework.rewriter import Rewriter

__all__ = ["Plan", "apply_plan", "copy_model", "int8_form"]


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
        nbits: indices of MatMul/Gemm candidates not in ``chosen`` to compute as block-wise
            weight-only ``MatMulNBits`` instead of float (the bits are its writer's).
        static: static activation quantization by activation name: the uint8 ``(scale, zero_point)``
            (0-d arrays) of its quantizer's input (after smoothing and outlier masking), from
            calibration (:mod:`passes.quantization.static_scales`); a ``QuantizeLinear`` with these
            constants replaces the run-time ``DynamicQuantizeLinear``.
    """

    chosen: frozenset[int]
    per_channel: bool
    reduce_range: bool
    signed: bool
    format: str
    smooth: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    outliers: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    nbits: frozenset[int] = frozenset()
    static: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)


def _static_quantizer(graph: ir.Graph, rw: Rewriter, x: ir.Value, qparams: tuple[np.ndarray, np.ndarray],
                      base: str, *, before: ir.Node | None = None, after: ir.Node | None = None,
                      into: ir.Graph | None = None) -> tuple[ir.Value, ir.Value, ir.Value]:
    """``QuantizeLinear(x, scale, zero_point)`` with constant (calibrated) parameters: ``(x_q, scale, zero_point)``.

    The node goes before ``before``, after ``after``, or at the end of ``into``; the constants into ``graph``.
    """
    scale = rw.constant(graph, np.asarray(qparams[0], np.float32), name=f"{base}_static_scale")
    zp = rw.constant(graph, np.asarray(qparams[1], np.uint8), name=f"{base}_static_zero_point")
    q = rw.make("QuantizeLinear", [x, scale, zp], before=before, after=after, graph=into, name=f"{base}_static_quant",
                output_names=[f"{base}_static_q"], types=[ir.TensorType(ir.DataType.UINT8, None)])
    return q.outputs[0], scale, zp


def _bias_add(node: ir.Node, n: int) -> ir.Node | None:
    """The ``Add`` of a constant ``[N]`` bias that alone reads a MatMul's output, if any."""
    out = node.outputs[0]
    if out is None or out.is_graph_output() or len(out.uses()) != 1:
        return None
    add, idx = out.uses()[0]
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None
    b = initializer_array(add.inputs[1 - idx])
    if b is None or b.dtype != np.float32 or b.shape not in ((n,), (1, n)):
        return None
    return add


def _outlier_inputs(graph: ir.Graph, rw: Rewriter, x: ir.Value, idx: np.ndarray, k: int, first: ir.Node | None,
                    base: str, *, into: ir.Graph | None = None) -> tuple[ir.Value, ir.Value]:
    """``(x * mask, Gather(x, idx, axis=-1))``: the activation without its outlier channels, and those channels.

    ``k`` is the channel count (the weight's ``K``). The nodes go before ``first``, or at the end of ``into``.
    """
    mask = np.ones(k, np.float32)
    mask[idx] = 0.0
    gather = rw.make("Gather", [x, rw.constant(graph, idx.astype(np.int64), name=f"{base}_outlier_idx")],
                     {"axis": -1}, before=first, graph=into, name=f"{base}_outliers", output_names=[f"{base}_outliers"],
                     types=[ir.TensorType(ir.DataType.FLOAT, None)])
    masked = rw.make("Mul", [x, rw.constant(graph, mask, name=f"{base}_inlier_mask")], before=first, graph=into,
                     name=f"{base}_inliers", output_names=[f"{base}_inliers"], types=[x.type])
    return masked.outputs[0], gather.outputs[0]


def _smooth(graph: ir.Graph, rw: Rewriter, x: ir.Value, readers: list[ir.Node], s: np.ndarray) -> ir.Value:
    """Divide activation ``x`` by ``s`` for ``readers``; returns the value they should read.

    Folds ``1/s`` into the normalization's gamma and beta when the readers are all of ``x``'s
    readers, else inserts ``Mul(x, 1/s)``.
    """
    prod = x.producer()
    key = (prod.domain, prod.op_type) if prod is not None else None
    if (
        prod is not None and key in NORM_OPS and x.index() == 0 and not x.is_graph_output()
        and {n for n, _ in x.uses()} <= set(readers)
    ):
        gi, bi = NORM_OPS[key]
        gamma = initializer_array(prod.inputs[gi]) if gi < len(prod.inputs) else None
        beta = initializer_array(prod.inputs[bi]) if bi is not None and bi < len(prod.inputs) else None
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


def apply_plan(model: ir.Model, candidates: list[Candidate], plan: Plan, weight_only: Any = None) -> Rewriter:
    """Quantize the chosen candidates of ``model`` in place.

    ``weight_only`` (a :class:`~passes.quantization.weight_only.WeightOnlyQuantizePass`, passed in by
    the caller: that module imports this one) writes the plan's ``nbits`` ops at its ``bits``; it is
    needed only when there are some.

    Returns:
        The rewriter that made the changes (its stats count the quantized ops).
    """
    rw = Rewriter()
    graph = model.graph
    nodes = list(graph)
    chosen = [(c, nodes[c.index]) for c in candidates if c.index in plan.chosen]
    nbits_ops = [(c, nodes[c.index]) for c in candidates
                 if c.index in plan.nbits and c.index not in plan.chosen and c.op != "Attention"]
    if not chosen and not nbits_ops:
        return rw
    for c, node in chosen + nbits_ops:
        if node.op_type != c.op or node.inputs[0] is None or node.inputs[0].name != c.activation:
            raise PassError(f"quantize: candidate {c.name} no longer matches node {node.label()}")
    if nbits_ops:
        if weight_only is None:
            raise PassError("quantize: a plan with MatMulNBits ops needs their writer (weight_only=)")
        for c, node in nbits_ops:
            weight_only._rewrite(graph, rw, node, c.op, weight_only.bits)
            rw.count(f"{c.op} -> MatMulNBits ({weight_only.bits}-bit)")
        rw.import_opset(model, MS)
    if plan.format == "integer-ops":
        rw.import_opset(model, MS)
    # Group the chosen ops by the activation they read; smoothing may give a group a new activation.
    groups: dict[str, list[tuple[Candidate, ir.Node]]] = {}
    for c, node in chosen:
        groups.setdefault(c.activation, []).append((c, node))
    for act, members in groups.items():
        x = members[0][1].inputs[0]
        assert x is not None
        weights = {id(node): weight_of(node) for _, node in members}
        s = plan.smooth.get(act)
        if s is not None:
            x = _smooth(graph, rw, x, [n for _, n in members], s)
            weights = {k: (w * s[:, None], b) for k, (w, b) in weights.items()}  # type: ignore[misc]
        # An Attention reads the activation without outlier masking (its output is not linear in
        # it): it quantizes its input apart from the activation's other readers.
        for attention in (False, True):
            readers = [(c, n) for c, n in members if (c.op == "Attention") == attention]
            if not readers:
                continue
            first = min((n for _, n in readers), key=lambda n: _position(graph, n))
            q = _quantized_input(graph, rw, x, plan, readers[0][0], shared=len(readers) > 1,
                                 base=act + ("_attention" if attention and len(readers) < len(members) else ""),
                                 before=first)
            for c, node in readers:
                w, b = weights[id(node)]  # type: ignore[misc]
                _replace_with_int8(graph, rw, c, node, q, w, b, plan)
    return rw


@dataclass(frozen=True)
class _QuantizedInput:
    """What the int8 ops of one activation read.

    Attributes:
        x: the float activation their quantizer reads (smoothed, outlier channels masked).
        quant: ``(x_q, scale, zero_point)`` of a quantizer they share (dynamic, or static with
            calibrated constants), ``(dequantized,)`` in the ``qdq`` format, or ``None``: each op
            quantizes ``x`` itself (``DynamicQuantizeMatMul``).
        outlier: the gathered outlier channels and their indices, or ``None``.
    """

    x: ir.Value
    quant: tuple[ir.Value, ...] | None
    outlier: tuple[ir.Value, np.ndarray] | None


def _quantized_input(graph: ir.Graph, rw: Rewriter, x: ir.Value, plan: Plan, c: Candidate, *, shared: bool, base: str,
                     before: ir.Node | None = None, into: ir.Graph | None = None) -> _QuantizedInput:
    """The quantized activation ``x`` (of ``c`` and, with ``shared``, of other readers too) as ``plan`` says.

    The nodes go before ``before`` or at the end of ``into``; the constants into ``graph``.
    """
    act = c.activation
    idx = plan.outliers.get(act)
    outlier: tuple[ir.Value, np.ndarray] | None = None
    if idx is not None and len(idx) and c.op != "Attention":
        x, gathered = _outlier_inputs(graph, rw, x, idx, c.weight_shape[0], before, base, into=into)
        outlier = (gathered, idx)
        rw.count("outlier channels", len(idx))
    static = plan.static.get(act)
    quant: tuple[ir.Value, ...] | None = None
    if static is not None:
        quant = _static_quantizer(graph, rw, x, static, base, before=before, into=into)
        rw.count("static activation scales")
    elif plan.format == "qdq" or shared or c.op == "Attention":
        quant = tuple(rw.make("DynamicQuantizeLinear", [x], before=before, graph=into, name=f"{base}_quant",
                              num_outputs=3, output_names=[f"{base}_q", f"{base}_scale", f"{base}_zero_point"]).outputs)
    if plan.format == "qdq":
        assert quant is not None
        dq = rw.make("DequantizeLinear", list(quant), before=before, graph=into, name=f"{base}_dequant",
                     output_names=[f"{base}_dq"], types=[x.type])
        quant = (dq.outputs[0],)
    return _QuantizedInput(x, quant, outlier)


def _int8_op(graph: ir.Graph, rw: Rewriter, c: Candidate, node: ir.Node, q: _QuantizedInput, w: np.ndarray,
             bias: np.ndarray | None, plan: Plan, base: str, out_type: ir.Type | None, *,
             before: ir.Node | None = None, into: ir.Graph | None = None) -> ir.Value:
    """The int8 op of candidate ``c`` (``node``) on ``q`` with the effective weight ``w`` and ``bias``; its value.

    ``qdq``: ``node``'s own op on the dequantized activation and weight (a Gemm keeps its ``C`` and
    ``beta``; ``alpha`` is in ``w``); ``integer-ops``: ``QAttention``, ``MatMulIntegerToFloat`` on a
    shared quantizer, else ``DynamicQuantizeMatMul``, with ``bias`` inside. The outlier channels'
    float product is added. The nodes go before ``before`` or at the end of ``into``.
    """
    at: dict[str, Any] = {"before": before, "graph": into}
    if plan.format == "qdq":
        assert q.quant is not None
        transposed = c.op == "Gemm" and bool(node.attributes["transB"].value if "transB" in node.attributes else 0)
        qw = quantize_weight(w.T if transposed else w, per_channel=plan.per_channel, signed=plan.signed,
                             reduce_range=plan.reduce_range, axis=0 if transposed else 1)
        ins = [rw.constant(graph, qw.q, name=f"{base}_w_q"), rw.constant(graph, qw.scale, name=f"{base}_w_scale"),
               rw.constant(graph, qw.zero_point, name=f"{base}_w_zero_point")]
        dqw = rw.make("DequantizeLinear", ins, {"axis": qw.axis} if qw.axis is not None else {},
                      name=f"{base}_w_dequant", output_names=[f"{base}_w_dq"],
                      types=[ir.TensorType(ir.DataType.FLOAT, qw.q.shape)], **at)
        attrs = {k: a for k, a in node.attributes.items() if k != "alpha"}
        new = rw.make(c.op, [q.quant[0], dqw.outputs[0], *node.inputs[2:]], attrs, name=f"{base}_quant",
                      output_names=[f"{base}_out"], types=[out_type], **at)
    else:
        qw = quantize_weight(w, per_channel=plan.per_channel, signed=plan.signed, reduce_range=plan.reduce_range,
                             axis=1)
        wq = rw.constant(graph, qw.q, name=f"{base}_w_q")
        ws = rw.constant(graph, qw.scale, name=f"{base}_w_scale")
        wz = rw.constant(graph, qw.zero_point, name=f"{base}_w_zero_point")
        b = rw.constant(graph, bias.astype(np.float32), name=f"{base}_bias") if bias is not None else None
        if c.op == "Attention":
            assert q.quant is not None and b is not None
            xq, xs, xz = q.quant
            mask = node.inputs[3] if len(node.inputs) > 3 else None
            attrs = {k: a for k, a in node.attributes.items() if k in QATTENTION_ATTRS}
            new = rw.make("QAttention", [xq, wq, b, xs, ws, mask, xz, wz], dict(attrs), domain=MS,
                          name=f"{base}_quant", output_names=[f"{base}_out"], types=[out_type], **at)
        elif q.quant is not None:
            xq, xs, xz = q.quant
            new = rw.make("MatMulIntegerToFloat", [xq, wq, xs, ws, xz, wz, b], domain=MS, name=f"{base}_quant",
                          output_names=[f"{base}_out"], types=[out_type], **at)
        else:
            new = rw.make("DynamicQuantizeMatMul", [q.x, wq, ws, wz, b], domain=MS, name=f"{base}_quant",
                          output_names=[f"{base}_out"], types=[out_type], **at)
    out = new.outputs[0]
    if q.outlier is not None:
        part = _outlier_matmul(graph, rw, q.outlier, w, base, before=before, into=into)
        out = rw.make("Add", [out, part], name=f"{base}_add_outliers", output_names=[f"{base}_with_outliers"],
                      types=[out_type], **at).outputs[0]
    assert out is not None
    return out


def _replace_with_int8(graph: ir.Graph, rw: Rewriter, c: Candidate, node: ir.Node, q: _QuantizedInput, w: np.ndarray,
                       bias: np.ndarray | None, plan: Plan) -> None:
    """Replace ``node`` by its int8 op (:func:`_int8_op`); in ``integer-ops`` a MatMul's bias ``Add`` goes inside."""
    old = [v for v in node.inputs[1:] if v is not None]
    replaced, erase = node.outputs[0], [node]
    if plan.format != "qdq" and bias is None and c.op == "MatMul":
        add = _bias_add(node, w.shape[1])
        if add is not None:
            other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
            bias = initializer_array(other).reshape(-1)  # type: ignore[union-attr]
            replaced, erase = add.outputs[0], [add, node]
            old.append(other)  # type: ignore[arg-type]
    assert replaced is not None
    out = _int8_op(graph, rw, c, node, q, w, bias, plan, node.name or c.activation, replaced.type, before=node)
    rw.replace_all_uses_with(replaced, out)
    rw.erase(erase)
    rw.count(f"quantized {c.op}")
    for v in old:
        _drop_unused(graph, rw, v)


def _outlier_matmul(graph: ir.Graph, rw: Rewriter, outlier: tuple[ir.Value, np.ndarray], w: np.ndarray, base: str,
                    *, before: ir.Node | None = None, after: ir.Node | None = None, into: ir.Graph | None = None
                    ) -> ir.Value:
    """The float product of the gathered outlier channels with their weight rows."""
    gathered, idx = outlier
    rows = rw.constant(graph, np.ascontiguousarray(w[idx, :], np.float32), name=f"{base}_outlier_w")
    mm = rw.make("MatMul", [gathered, rows], before=before, after=after, graph=into, name=f"{base}_outlier_matmul",
                 output_names=[f"{base}_outlier_part"], types=[ir.TensorType(ir.DataType.FLOAT, None)])
    return mm.outputs[0]


def _drop_unused(graph: ir.Graph, rw: Rewriter, value: ir.Value | None) -> None:
    if value is not None and value.is_initializer() and not value.has_uses() and not value.is_graph_output() \
            and not value.is_graph_input():
        rw.remove_initializer(graph, value.name)


def copy_model(model: ir.Model) -> ir.Model:
    """A copy of ``model`` to rewrite: new graphs and nodes, the same (immutable) tensors (:func:`ir.copy_model`)."""
    return ir.copy_model(model)


def int8_form(rw: Rewriter, c: Candidate, node: ir.Node, plan: Plan, into: ir.Graph, *, base: str = "") -> ir.Value:
    """The int8 form of candidate ``c`` (``node``, left as it is) on its input, written at the end of
    ``into`` (an If branch, or the probe's main graph), its constants too: onnxruntime pre-packs a
    subgraph's own weights only. Its value comes back; ``base`` prefixes the new names.

    The ops :func:`apply_plan` writes (:func:`_quantized_input`, :func:`_int8_op`), with a quantizer
    of its own, the smoothing as a ``Mul`` and a MatMul's bias ``Add`` left outside: the same numbers.
    """
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None and y is not None
    w, bias = weight_of(node)  # type: ignore[misc]
    base = base or f"switch{c.index}"
    s = plan.smooth.get(c.activation)
    if s is not None:
        inv = rw.constant(into, (1.0 / s).astype(np.float32), name=f"{c.activation}_smooth_inv")
        x = rw.make("Mul", [x, inv], graph=into, types=[x.type]).outputs[0]
        w = w * s[:, None]
    assert x is not None
    q = _quantized_input(into, rw, x, plan, c, shared=False, base=base, into=into)
    return _int8_op(into, rw, c, node, q, w, bias, plan, base, y.type, into=into)
