"""What ``quantize`` may quantize: the :class:`Candidate` ops and their effective float weights.

A candidate is a ``MatMul`` or ``Gemm`` with a constant 2-D float32 weight, or a
``com.microsoft::Attention`` whose packed ``[H, 3H]`` QKV weight and attributes ``QAttention``
understands. :func:`weight_of` gives the ``[K, N]`` weight (and bias) the emitters quantize,
with Gemm's ``transB`` and ``alpha`` / ``beta`` folded in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import ir

__all__ = ["MS", "NORM_OPS", "QATTENTION_ATTRS", "Candidate", "find_candidates",
           "initializer_array", "weight_of"]

MS = "com.microsoft"
#: Producers whose output is a normalized activation SmoothQuant may rescale: op -> (gamma, beta) inputs.
NORM_OPS: dict[tuple[str, str], tuple[int, int | None]] = {
    ("", "LayerNormalization"): (1, 2),
    (MS, "LayerNormalization"): (1, 2),
    (MS, "SkipLayerNormalization"): (2, 3),
    (MS, "SimplifiedLayerNormalization"): (1, None),
    (MS, "SkipSimplifiedLayerNormalization"): (2, None),
    (MS, "EmbedLayerNormalization"): (5, 6),
}
#: Attention attributes QAttention understands; an Attention with any other one is left float.
QATTENTION_ATTRS = {"num_heads", "unidirectional", "scale", "mask_filter_value", "do_rotary",
                    "past_present_share_buffer"}


def initializer_array(value: ir.Value | None) -> np.ndarray | None:
    """The data of ``value`` when it is an initializer, else ``None``."""
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value.numpy()


def _is_float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (None, ir.DataType.FLOAT)


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


def weight_of(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The effective ``[K, N]`` float weight and ``[N]`` bias of a MatMul/Gemm/Attention, or None."""
    op = node.op_type
    if op == "MatMul":
        w = initializer_array(node.inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            return None
        return w, None
    if op == "Gemm":
        a = {k: v.value for k, v in node.attributes.items()}
        if a.get("transA", 0) or len(node.inputs) < 2:
            return None
        w = initializer_array(node.inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            return None
        w = (w.T if a.get("transB", 0) else w) * np.float32(a.get("alpha", 1.0))
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = initializer_array(node.inputs[2])
            if c is None or c.dtype != np.float32 or c.size not in (1, w.shape[1]) or c.ndim > 2 or (
                c.ndim == 2 and c.shape[0] != 1
            ):
                return None
            bias = np.broadcast_to(c.reshape(-1), (w.shape[1],)) * np.float32(a.get("beta", 1.0))
        return w.astype(np.float32), None if bias is None else bias.astype(np.float32)
    if op == "Attention":
        if set(node.attributes) - QATTENTION_ATTRS or "num_heads" not in node.attributes:
            return None
        if any(v is not None for v in node.inputs[4:]):  # past, attention_bias, past_sequence_length
            return None
        if len(node.outputs) > 1 and node.outputs[1] is not None and (
            node.outputs[1].has_uses() or node.outputs[1].is_graph_output()
        ):
            return None
        w, b = initializer_array(node.inputs[1]), initializer_array(node.inputs[2]) if len(node.inputs) > 2 else None
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
        op, dom = node.op_type, node.domain
        if op not in ops or (op == "Attention") != (dom == MS) or (op != "Attention" and dom != ""):
            continue
        if op in exclude or node.name in exclude or not node.inputs or not _is_float32(node.inputs[0]):
            continue
        if node.inputs[0] is None or initializer_array(node.inputs[0]) is not None:
            continue
        wb = weight_of(node)
        if wb is None:
            continue
        out.append(Candidate(index, node.label(), op, node.inputs[0].name, tuple(wb[0].shape)))
    return out
