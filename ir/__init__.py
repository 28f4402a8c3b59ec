"""The compiler's graph IR.

ONNX is lowered into it (:func:`load`, :func:`from_onnx`), passes rewrite it in place, and it is
emitted back (:func:`save`, :func:`to_onnx`). Only :mod:`ir.lower` and :mod:`ir.emit` import ``onnx``.

A tour::

    import ir
    model = ir.load("model.onnx")
    for node in model.graph:                 # nodes in topological order
        for value in node.outputs:
            print(value.name, value.type, [(u.op_type, i) for u, i in value.uses()])
    print(model)                              # deterministic text form
    ir.verify(model)
    ir.save(model, "out.onnx")
"""

from __future__ import annotations

from ._core import Attr, AttrType, Function, Graph, Model, Node, Value
from ._dtypes import DataType
from ._errors import (
    CycleError,
    DuplicateNameError,
    IRError,
    InvalidModelError,
    ModelLoadError,
    UndefinedValueError,
    UnknownDomainError,
    UnknownDTypeError,
    UnsupportedError,
    VerificationError,
)
from ._parser import ParseError, parse_graph, parse_model
from ._printer import print_graph, print_model
from ._signature import AttrSpec, FormalParam, OpSignature
from ._tensor import ExternalLocation, Tensor, release_mapped_pages
from ._types import (
    Dim, MapType, OpaqueType, OptionalType, SequenceType, Shape, SparseTensorType, TensorType, Type,
)
from ._validate import check_opsets, validate
from ._verify import verify
from .emit import Snapshot, save, to_onnx, to_onnx_referencing, to_onnx_sharing
from .lower import from_onnx, infer_shapes, load, op_signature
from ._copy import copy_model

__all__ = [
    "Attr", "AttrType", "CycleError", "Snapshot", "DataType", "Dim", "DuplicateNameError", "ExternalLocation",
    "Function", "Graph", "IRError", "MapType", "Model", "ModelLoadError", "Node", "OpaqueType",
    "OptionalType", "ParseError", "SequenceType", "Shape", "SparseTensorType", "Tensor", "TensorType", "Type",
    "UndefinedValueError", "UnknownDTypeError", "UnsupportedError", "Value", "VerificationError",
    "check_opsets", "copy_model", "from_onnx", "release_mapped_pages", "to_onnx_referencing", "infer_shapes", "load", "parse_graph", "parse_model", "print_graph", "print_model", "save", "structurally_equal", "to_onnx", "to_onnx_sharing",
    "verify", "InvalidModelError", "UnknownDomainError", "validate", "op_signature", "OpSignature", "FormalParam", "AttrSpec",
]


def structurally_equal(a: Model | Graph, b: Model | Graph) -> bool:
    """True when two models (or graphs) have the same text form: same structure, names and data."""
    if isinstance(a, Model) and isinstance(b, Model):
        return print_model(a) == print_model(b)
    if isinstance(a, Graph) and isinstance(b, Graph):
        return print_graph(a) == print_graph(b)
    return False


def __getattr__(name: str) -> object:
    # Optional extras load on first use: importing ir needs neither networkx nor graphsurgeon.
    if name == "to_networkx":
        from .interop import to_networkx

        return to_networkx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ += ["to_networkx"]
