"""A candidate's quantized forms, and the switch model that holds them all behind run-time flags.

A :class:`Form` writes one quantized form of a candidate op on the op's input: ``quantize``'s int8
form as its :class:`~passes.quantization._emit.Plan` says (:func:`quantize_forms`), or a ``bits``-bit
block-wise weight-only ``MatMulNBits`` (:func:`nbits_form`). The same writers make both models the
searches measure on:

* the *switch model* (:func:`build_switch_model`): each candidate becomes a chain of ``If`` nodes on
  scalar bool inputs, one a form, the float op in the last else-branch; one onnxruntime session
  then measures any assignment of forms and runs only the selected form of each op;
* the *probe model* (:func:`passes.quantization.local_error.build_probe_model`): every form beside
  every float op, for the ops' local errors.

So both measure the arithmetic that ships (:func:`~passes.quantization._emit.apply_plan` and
``quantize-weights``' rewrite; the property tests hold them equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import ir

from ._candidates import MS, Candidate, weight_of
from ._emit import Plan, copy_model, int8_form
from ..framework.numerics import FILE_BYTES, tensor_bytes
from ..framework.rewriter import Rewriter

__all__ = ["Form", "build_switch_model", "flag_feeds", "nbits_form", "quantize_forms"]


@dataclass(frozen=True)
class Form:
    """One quantized form of a candidate op.

    Attributes:
        write: ``(graph, rewriter, candidate, node, base) -> value``: the form of ``node`` on its
            input (``node`` left as it is), written at the end of ``graph`` with its constants;
            ``base`` prefixes the new names.
        ops: the candidate ops (``Candidate.op``) it applies to; ``None``: every one.
    """

    write: Callable[[ir.Graph, Rewriter, Candidate, ir.Node, str], ir.Value]
    ops: frozenset[str] | None = None

    def applies(self, c: Candidate) -> bool:
        """Whether this form exists for candidate ``c``."""
        return self.ops is None or c.op in self.ops


def quantize_forms(plan: Plan, weight_only: Any = None) -> dict[str, Form]:
    """The ``quantize`` pass's forms: ``int8`` as ``plan`` writes it, and with ``weight_only`` (the
    MatMulNBits writer) ``nbits``, the weight-only form at the writer's ``bits`` of MatMul/Gemm
    candidates (it reads the unsmoothed activation, as ``apply_plan``'s do)."""
    forms = {"int8": Form(lambda graph, rw, c, node, base: int8_form(rw, c, node, plan, graph, base=base))}
    if weight_only is not None:
        forms["nbits"] = nbits_form(weight_only, weight_only.bits)
    return forms


def nbits_form(weight_only: Any, bits: int) -> Form:
    """The ``bits``-bit ``MatMulNBits`` form of a MatMul/Gemm candidate (``weight_only``: the writer,
    a :class:`~passes.quantization.weight_only.WeightOnlyQuantizePass`)."""

    def write(graph: ir.Graph, rw: Rewriter, c: Candidate, node: ir.Node, base: str) -> ir.Value:
        w, bias = weight_of(node)  # type: ignore[misc]
        y = node.outputs[0]
        out = weight_only._nbits(graph, rw, node.inputs[0], w, bias, bits, base, y.type if y is not None else None,
                                 into=graph).outputs[0]
        assert out is not None
        return out

    return Form(write, frozenset({"MatMul", "Gemm"}))


def build_switch_model(model: ir.Model, candidates: list[Candidate], forms: dict[str, Form], *,
                       local_weights: bool | None = None) -> tuple[ir.Model, dict[tuple[int, str], str]]:
    """A copy of ``model`` where every candidate can be switched between its ``forms`` at run time.

    Each candidate becomes a chain of ``If`` nodes, one for each form that applies to it, on a scalar
    bool graph input: the then-branch computes that form, the else-branch the next ``If``, the last
    else-branch the float op itself (moved there). At most one form of an op is on. One onnxruntime
    session then measures any assignment of forms, instead of one session an assignment, and runs
    only the selected form of each op (the arithmetic blend this replaced, ``y + flag * (y_q - y)``,
    ran every form: 2-3x the model's work). All flags off is the float model exactly.

    The branches read the activation (and an ``Attention``'s mask) from the enclosing graph and hold
    their weights as their own initializers: onnxruntime pre-packs no weight a subgraph reads from
    outside it (a MatMulNBits then even computes other numbers). The float weights move into the
    else-branches with ``local_weights``; by default only when the model is small enough to be
    loaded from bytes (:data:`~passes.framework.numerics.FILE_BYTES`). A bigger one is saved to a
    file referencing the original's weight file, which a subgraph cannot do (ONNX's checker refuses
    hard-linked data there), so its float branches read the weights from outside, unpacked.

    Returns:
        The copy, and the flag input's name for each ``(candidate index, form)`` (see :func:`flag_feeds`).
    """
    if local_weights is None:
        local_weights = tensor_bytes(model) <= FILE_BYTES
    m = copy_model(model)
    graph = m.graph
    rw = Rewriter()
    rw.import_opset(m, MS)
    nodes = list(graph)
    flags: dict[tuple[int, str], str] = {}
    for c in candidates:
        node = nodes[c.index]
        y = node.outputs[0]
        assert y is not None and node.inputs[0] is not None
        mine = [(form, f) for form, f in forms.items() if f.applies(c)]
        names = [graph.unique_name(f"quant_flag_{c.index}_{form}") for form, _ in mine]
        # The If nodes go in first, so that the branches' names are drawn from the model's.
        where: ir.Graph | ir.Node = node
        branches: list[ir.Graph] = []
        outer: ir.Value | None = None
        for (form, _), name in zip(mine, names):
            flag = graph.add_input(ir.Value(name, ir.TensorType(ir.DataType.BOOL, ())))
            then_g = ir.Graph(name=f"switch{c.index}_{form}")
            else_g = ir.Graph(name=f"switch{c.index}_{form}_else")
            kw: dict[str, Any] = {"before": where} if isinstance(where, ir.Node) else {"graph": where}
            sel = rw.make("If", [flag], {"then_branch": then_g, "else_branch": else_g}, name=f"switch{c.index}_{form}",
                          output_names=[f"switch{c.index}_{form}_out"], types=[y.type], **kw)
            if outer is None:
                outer = sel.outputs[0]
            else:
                rw.set_outputs(where, [sel.outputs[0]])  # type: ignore[arg-type, list-item]
            branches.append(then_g)
            where = else_g
        if outer is None:  # no form applies
            continue
        assert isinstance(where, ir.Graph)
        for then_g, (form, f) in zip(branches, mine):
            out = f.write(then_g, rw, c, node, f"switch{c.index}_{form}")
            rw.set_type(out, y.type)
            rw.set_outputs(then_g, [out])
        rw.replace_all_uses_with(y, outer)
        rw.move_into(node, where)
        if local_weights:
            _localize_weights(graph, rw, node)
        rw.set_outputs(where, [y])
        flags.update({(c.index, form): name for (form, _), name in zip(mine, names)})
    graph.sort()
    return m, flags


def _localize_weights(graph: ir.Graph, rw: Rewriter, node: ir.Node) -> None:
    """Move the initializers of ``graph`` that only ``node`` (now in a subgraph) reads into ``node``'s graph.

    onnxruntime pre-packs only a subgraph's own initializers: a weight read from the enclosing
    graph is not packed (slower, and MatMulNBits' ``accuracy_level`` is then not applied).
    """
    home = node.graph
    assert home is not None
    for v in node.inputs:
        if (v is None or graph.initializers.get(v.name) is not v or v.is_graph_input() or v.is_graph_output()
                or any(user is not node for user, _ in v.uses()) or v.returned_by()):
            continue
        rw.move_initializer(v, home)


def flag_feeds(flags: dict[tuple[int, str], str], forms: dict[int, str]) -> dict[str, np.ndarray]:
    """The switch model's flag inputs for ``forms`` (candidate index -> form name; absent: float).

    Raises:
        KeyError: a form the switch model does not hold for that candidate (it would run in float).
    """
    missing = [key for key in forms.items() if key not in flags]
    if missing:
        raise KeyError(f"the switch model holds no form {missing[0][1]!r} for candidate {missing[0][0]}")
    return {name: np.array(forms.get(i) == form) for (i, form), name in flags.items()}
