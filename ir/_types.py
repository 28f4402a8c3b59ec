"""Value types: tensors with symbolic shapes, and ONNX's sequence, optional, map and sparse types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ._dtypes import DataType

__all__ = [
    "Dim",
    "Shape",
    "TensorType",
    "SparseTensorType",
    "SequenceType",
    "OptionalType",
    "MapType",
    "OpaqueType",
    "Type",
    "format_shape",
]

#: One dimension: a size, a symbolic name, or ``None`` when unknown.
Dim = Union[int, str, None]
#: A shape: a tuple of dims, or ``None`` when even the rank is unknown.
Shape = Union[tuple[Dim, ...], None]


def format_shape(shape: Shape) -> str:
    """Render a shape as ``[batch,16,?]`` (``?`` for unknown dims), or ``[...]`` for unknown rank."""
    if shape is None:
        return "[...]"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class TensorType:
    """A dense tensor of ``dtype`` with an optional (possibly symbolic) ``shape``."""

    dtype: DataType
    shape: Shape = None
    denotation: str = ""

    def __str__(self) -> str:
        return f"{self.dtype.short_name}{format_shape(self.shape)}"


@dataclass(frozen=True)
class SparseTensorType:
    """A sparse tensor of ``dtype``."""

    dtype: DataType
    shape: Shape = None
    denotation: str = ""

    def __str__(self) -> str:
        return f"sparse<{self.dtype.short_name}{format_shape(self.shape)}>"


@dataclass(frozen=True)
class SequenceType:
    """An ONNX sequence of ``elem`` (``elem`` may be ``None`` when unknown)."""

    elem: Type | None
    denotation: str = ""

    def __str__(self) -> str:
        return f"seq<{self.elem if self.elem is not None else '?'}>"


@dataclass(frozen=True)
class OptionalType:
    """An ONNX optional of ``elem``."""

    elem: Type | None
    denotation: str = ""

    def __str__(self) -> str:
        return f"optional<{self.elem if self.elem is not None else '?'}>"


@dataclass(frozen=True)
class MapType:
    """An ONNX map from ``key`` element type to ``value`` type."""

    key: DataType
    value: Type | None
    denotation: str = ""

    def __str__(self) -> str:
        return f"map<{self.key.short_name},{self.value if self.value is not None else '?'}>"


@dataclass(frozen=True)
class OpaqueType:
    """An ONNX opaque type, kept by domain and name."""

    domain: str
    name: str
    denotation: str = ""

    def __str__(self) -> str:
        return f"opaque<{self.domain}:{self.name}>"


Type = Union[TensorType, SparseTensorType, SequenceType, OptionalType, MapType, OpaqueType]
