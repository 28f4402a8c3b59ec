"""Operator signatures: what an op's schema says, as plain data.

:func:`ir.lower.op_signature` reads them from ONNX's schemas (``onnx.defs``), so that code outside
``ir/lower.py`` and ``ir/emit.py`` can check nodes without importing ``onnx``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._core import AttrType

__all__ = ["OpSignature", "FormalParam", "AttrSpec"]


@dataclass(frozen=True)
class FormalParam:
    """One formal input or output of an op.

    Attributes:
        name: the schema's name for it (``"data"``, ``"axes"``).
        option: ``"single"`` (required), ``"optional"`` or ``"variadic"`` (the last one, repeated).
        type_param: the type parameter it is bound to (``"T"``), or ``""`` for a fixed type.
        tensor_types: element types (ONNX ``TensorProto`` numbers) it accepts as a tensor; empty
            when it takes no tensors (sequences, maps) or when the schema does not say.
        homogeneous: for a variadic parameter, whether all its values share one type.
        min_arity: for a variadic parameter, how many values it needs at least.
    """

    name: str
    option: str
    type_param: str = ""
    tensor_types: frozenset[int] = frozenset()
    homogeneous: bool = True
    min_arity: int = 1


@dataclass(frozen=True)
class AttrSpec:
    """One attribute an op declares: its kind and whether a node must give it."""

    name: str
    type: AttrType
    required: bool


@dataclass(frozen=True)
class OpSignature:
    """An op's schema at one opset version.

    Attributes:
        domain: ``""`` for the default ONNX domain.
        op_type: the op.
        since_version: the opset version that introduced this form of the op.
        inputs: formal inputs, in order.
        outputs: formal outputs, in order.
        min_inputs: fewest inputs a node may list (omitted optional inputs count).
        max_inputs: most inputs a node may list.
        min_outputs: fewest outputs.
        max_outputs: most outputs.
        attributes: the attributes the op declares, by name.
        deprecated: the op is deprecated at this version (runtimes refuse it).
    """

    domain: str
    op_type: str
    since_version: int
    inputs: tuple[FormalParam, ...]
    outputs: tuple[FormalParam, ...]
    min_inputs: int
    max_inputs: int
    min_outputs: int
    max_outputs: int
    attributes: dict[str, AttrSpec] = field(default_factory=dict, hash=False)
    deprecated: bool = False

    def input(self, index: int) -> FormalParam | None:
        """The formal parameter behind a node's input ``index`` (the variadic one repeats)."""
        return _formal(self.inputs, index)

    def output(self, index: int) -> FormalParam | None:
        """The formal parameter behind a node's output ``index``."""
        return _formal(self.outputs, index)


def _formal(params: tuple[FormalParam, ...], index: int) -> FormalParam | None:
    if index < len(params):
        return params[index]
    if params and params[-1].option == "variadic":
        return params[-1]
    return None
