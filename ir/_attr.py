"""Node attributes: :class:`AttrType` (numbered as ONNX's) and :class:`Attr`."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from ._errors import IRError
from ._tensor import Tensor

if TYPE_CHECKING:
    from ._graph import Graph

__all__ = ["AttrType", "Attr"]


class AttrType(enum.IntEnum):
    """Attribute kinds, numbered as ONNX's ``AttributeProto.AttributeType``."""

    UNDEFINED = 0
    FLOAT = 1
    INT = 2
    STRING = 3
    TENSOR = 4
    GRAPH = 5
    FLOATS = 6
    INTS = 7
    STRINGS = 8
    TENSORS = 9
    GRAPHS = 10
    SPARSE_TENSOR = 11
    SPARSE_TENSORS = 12
    TYPE_PROTO = 13
    TYPE_PROTOS = 14


class Attr:
    """A node attribute: a name, a kind and a value.

    ``ref_attr_name`` is set inside function bodies for attributes that refer to an attribute of
    the calling node; ``value`` is then ``None``.
    """

    __slots__ = ("name", "type", "value", "ref_attr_name", "doc_string")

    def __init__(
        self, name: str, type: AttrType, value: Any, *, ref_attr_name: str = "", doc_string: str = ""
    ) -> None:
        self.name = name
        self.type = type
        self.value = value
        self.ref_attr_name = ref_attr_name
        self.doc_string = doc_string

    @classmethod
    def infer(cls, name: str, value: Any) -> Attr:
        """Build an attribute from a Python value, guessing the kind (int, float, str, lists, Tensor, Graph)."""
        if isinstance(value, Attr):
            return value
        if isinstance(value, bool):
            return cls(name, AttrType.INT, int(value))
        if isinstance(value, int):
            return cls(name, AttrType.INT, value)
        if isinstance(value, float):
            return cls(name, AttrType.FLOAT, value)
        if isinstance(value, (str, bytes)):
            return cls(name, AttrType.STRING, value)
        if isinstance(value, Tensor):
            return cls(name, AttrType.TENSOR, value)
        from ._graph import Graph  # graphs hold nodes that hold attributes: imported on first need

        if isinstance(value, Graph):
            return cls(name, AttrType.GRAPH, value)
        if isinstance(value, (list, tuple)):
            items = list(value)
            if all(isinstance(v, (int, bool)) for v in items):
                return cls(name, AttrType.INTS, [int(v) for v in items])
            if all(isinstance(v, (int, float)) for v in items):
                return cls(name, AttrType.FLOATS, [float(v) for v in items])
            if all(isinstance(v, (str, bytes)) for v in items):
                return cls(name, AttrType.STRINGS, items)
            if all(isinstance(v, Tensor) for v in items):
                return cls(name, AttrType.TENSORS, items)
            if all(isinstance(v, Graph) for v in items):
                return cls(name, AttrType.GRAPHS, items)
        raise IRError(f"attribute {name!r}: cannot infer an ONNX attribute kind for {type(value).__name__}")

    def graphs(self) -> list[Graph]:
        """The subgraphs this attribute holds (empty for non-graph attributes)."""
        if self.type == AttrType.GRAPH:
            return [self.value]
        if self.type == AttrType.GRAPHS:
            return list(self.value)
        return []

    def __repr__(self) -> str:
        return f"Attr({self.name!r}, {self.type.name}, {self.value!r})"
