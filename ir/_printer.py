"""The deterministic text form of the IR.

The same graph always prints the same text (no ``id()``s, sorted opset and metadata keys), so the
text form serves as a golden file. Tensors up to ``inline_limit`` elements print their data;
larger ones print a content digest unless ``full_tensors`` is set. :mod:`ir._parser` reads the
form back.

Example::

    graph "g" (%x: float32[batch,4]) -> (%y: float32[batch,4]) {
      init %w: float32[4] = [1.0, 2.0, 3.0, 4.0]
      %y = Add(%x, %w)
    }
"""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np

from ._core import Attr, AttrType, Function, Graph, Model, Node, Value
from ._dtypes import DataType
from ._tensor import Tensor
from ._types import (
    MapType, OpaqueType, OptionalType, SequenceType, SparseTensorType, TensorType, Type,
)

__all__ = ["print_graph", "print_model", "format_type", "format_name"]

# Value and attribute names may hold ":" (torch's "onnx::MatMul_12") but not end with one, so
# "%x: float32" stays unambiguous. Ops, domains and dims never hold ":" ("::" separates domain and op).
_BARE = re.compile(r"^[A-Za-z_](?:[A-Za-z0-9_.\-/:]*[A-Za-z0-9_.\-/])?$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")
INLINE_LIMIT = 16


def format_name(name: str) -> str:
    """A name as it appears after ``%``: bare when simple, JSON-quoted otherwise."""
    return name if _BARE.match(name) else json.dumps(name)


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def format_type(t: Type | None) -> str:
    """Render a value type (``float32[batch,16]``, ``seq<int64[?]>``...)."""
    if t is None:
        return "?"
    if isinstance(t, TensorType):
        return t.dtype.short_name + _shape(t.shape)
    if isinstance(t, SparseTensorType):
        return f"sparse<{t.dtype.short_name}{_shape(t.shape)}>"
    if isinstance(t, SequenceType):
        return f"seq<{format_type(t.elem)}>"
    if isinstance(t, OptionalType):
        return f"optional<{format_type(t.elem)}>"
    if isinstance(t, MapType):
        return f"map<{t.key.short_name},{format_type(t.value)}>"
    if isinstance(t, OpaqueType):
        return f"opaque<{_q(t.domain)},{_q(t.name)}>"
    raise TypeError(t)


def _shape(shape: tuple | None) -> str:
    if shape is None:
        return ""
    dims = []
    for d in shape:
        if d is None:
            dims.append("?")
        elif isinstance(d, int):
            dims.append(str(d))
        else:
            dims.append(d if _IDENT.match(d) else _q(d))
    return "[" + ",".join(dims) + "]"


def _float(x: float, width: type | None = None) -> str:
    """Shortest text that reads back as the same number; ``width`` (e.g. ``np.float32``) rounds
    first, so a float32 prints as ``0.1``, the value ONNX stores, not ``0.10000000149011612``."""
    if width is not None:
        with np.errstate(over="ignore"):
            y = width(x)
        if not (np.isnan(y) or np.isinf(y)):
            r = str(y)
            return r if any(c in r for c in ".e") else r + ".0"
        x = float(y)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    r = repr(float(x))
    return r if any(c in r for c in ".e") else r + ".0"


def _scalar(x: object, dtype: DataType) -> str:
    if dtype == DataType.STRING:
        b = x if isinstance(x, bytes) else str(x).encode("utf-8", "surrogateescape")
        return _q(b.decode("utf-8", "surrogateescape"))
    if dtype == DataType.BOOL:
        return "true" if x else "false"
    if dtype in (DataType.FLOAT, DataType.FLOAT16):
        return _float(float(x), dtype.numpy().type)
    if dtype.is_float and dtype not in (DataType.COMPLEX64, DataType.COMPLEX128):
        return _float(float(x))
    if dtype in (DataType.COMPLEX64, DataType.COMPLEX128):
        c = complex(x)
        return f"({_float(c.real)},{_float(c.imag)})"
    return str(int(x))


def format_tensor(t: Tensor, *, full: bool = False) -> str:
    """Render a tensor: type, then inline data or a sha256 digest of its raw bytes."""
    head = t.dtype.short_name + "[" + ",".join(str(d) for d in t.shape) + "]"
    if t.size <= INLINE_LIMIT or full:
        arr = t.numpy()
        if t.dtype != DataType.STRING:
            arr = np.asarray(arr)
        flat = [_scalar(x, t.dtype) for x in np.asarray(arr).reshape(-1)]
        return f"{head} [{', '.join(flat)}]"
    if t.dtype == DataType.STRING:
        digest = hashlib.sha256("\0".join(map(str, t.numpy().ravel())).encode()).hexdigest()
    else:
        digest = hashlib.sha256(t.raw_bytes()).hexdigest()
    return f"{head} sha256:{digest[:16]}"


class _Printer:
    def __init__(self, full: bool) -> None:
        self.full = full
        self.lines: list[str] = []

    def attr(self, a: Attr, indent: str) -> str:
        if a.ref_attr_name:
            kind = f"({a.type.name.lower()})" if a.type != AttrType.UNDEFINED else ""
            return f"{format_name(a.name)}=@{format_name(a.ref_attr_name)}{kind}"
        v, k = a.value, a.type
        if k == AttrType.INT:
            s = str(int(v))
        elif k == AttrType.FLOAT:
            s = _float(v, np.float32)  # ONNX stores float attributes as float32
        elif k == AttrType.STRING:
            s = _q(v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v)
        elif k == AttrType.INTS:
            s = "ints[" + ", ".join(str(int(x)) for x in v) + "]"
        elif k == AttrType.FLOATS:
            s = "floats[" + ", ".join(_float(x, np.float32) for x in v) + "]"
        elif k == AttrType.STRINGS:
            s = "strings[" + ", ".join(
                _q(x.decode("utf-8", "surrogateescape") if isinstance(x, bytes) else x) for x in v
            ) + "]"
        elif k == AttrType.TENSOR:
            s = "tensor " + format_tensor(v, full=self.full)
        elif k == AttrType.TENSORS:
            s = "tensors[" + ", ".join(format_tensor(x, full=self.full) for x in v) + "]"
        elif k == AttrType.GRAPH:
            s = self.graph_text(v, indent)
        elif k == AttrType.GRAPHS:
            s = "graphs[" + ", ".join(self.graph_text(g, indent) for g in v) + "]"
        elif k == AttrType.TYPE_PROTO:
            s = "type " + format_type(v)
        elif k == AttrType.TYPE_PROTOS:
            s = "types[" + ", ".join(format_type(x) for x in v) + "]"
        elif k == AttrType.SPARSE_TENSOR:
            s = "sparse " + self.sparse(v)
        elif k == AttrType.SPARSE_TENSORS:
            s = "sparses[" + ", ".join(self.sparse(x) for x in v) + "]"
        else:
            s = "undefined"
        return f"{format_name(a.name)}={s}"

    def sparse(self, sp: object) -> str:
        values, indices, dims = sp  # type: ignore[misc]
        return "{" + format_tensor(values, full=self.full) + "; " + format_tensor(indices, full=self.full) + "; " + (
            "ints[" + ", ".join(map(str, dims)) + "]}"
        )

    def value_decl(self, v: Value) -> str:
        return f"%{format_name(v.name)}: {format_type(v.type)}"

    def graph_text(self, g: Graph, indent: str) -> str:
        inner = indent + "  "
        out = [f"graph {_q(g.name)} ("]
        out.append(", ".join(self.value_decl(v) for v in g.inputs))
        out.append(") -> (")
        out.append(", ".join(self.value_decl(v) for v in g.outputs))
        out.append(") {\n")
        if g.doc_string:
            out.append(f"{inner}doc {_q(g.doc_string)}\n")
        for k in sorted(g.metadata_props):
            out.append(f"{inner}meta {_q(k)} {_q(g.metadata_props[k])}\n")
        for name in sorted(g.initializers):
            v = g.initializers[name]
            out.append(f"{inner}init {self.value_decl(v)} = {format_tensor(v.const_value, full=self.full)}\n")
        for n in g:
            out.append(inner + self.node_text(n, inner) + "\n")
        out.append(indent + "}")
        return "".join(out)

    def node_text(self, n: Node, indent: str) -> str:
        outs = []
        for o in n.outputs:
            if o is None:
                outs.append("_")
            elif o.type is not None:
                outs.append(self.value_decl(o))
            else:
                outs.append(f"%{format_name(o.name)}")
        op = n.op_type if _IDENT.match(n.op_type) else _q(n.op_type)
        if n.domain:
            op = f"{_q(n.domain) if not _IDENT.match(n.domain) else n.domain}::{op}"
        if n.overload:
            op += f":{_q(n.overload)}"
        attrs = ""
        if n.attributes:
            attrs = "<" + ", ".join(self.attr(n.attributes[k], indent) for k in n.attributes) + ">"
        ins = ", ".join("_" if v is None else f"%{format_name(v.name)}" for v in n.inputs)
        text = f"{', '.join(outs)} = {op}{attrs}({ins})" if outs else f"{op}{attrs}({ins})"
        if n.name:
            text += f" name {_q(n.name)}"
        if n.doc_string:
            text += f" doc {_q(n.doc_string)}"
        for k in sorted(n.metadata_props):
            text += f" meta {_q(k)} {_q(n.metadata_props[k])}"
        return text

    def function_text(self, f: Function) -> str:
        head = f"function {_q(f.domain)} {_q(f.name)}"
        if f.overload:
            head += f" overload {_q(f.overload)}"
        for k in sorted(f.opset_imports):
            head += f" opset {_q(k)} {f.opset_imports[k]}"
        if f.attributes:
            head += " attrs[" + ", ".join(_q(a) for a in f.attributes) + "]"
        if f.attribute_defaults:
            head += " defaults<" + ", ".join(self.attr(a, "") for a in f.attribute_defaults) + ">"
        if f.doc_string:
            head += f" doc {_q(f.doc_string)}"
        return head + " " + self.graph_text(f.graph, "")


def print_graph(graph: Graph, *, full_tensors: bool = False) -> str:
    """The text form of one graph."""
    return _Printer(full_tensors).graph_text(graph, "")


def print_model(model: Model, *, full_tensors: bool = False) -> str:
    """The text form of a model: header, opsets, metadata, functions, then the main graph."""
    p = _Printer(full_tensors)
    lines = [
        f"model ir_version {model.ir_version} producer {_q(model.producer_name)} {_q(model.producer_version)}"
        f" domain {_q(model.domain)} version {model.model_version}"
    ]
    if model.doc_string:
        lines.append(f"doc {_q(model.doc_string)}")
    for k in sorted(model.opset_imports):
        lines.append(f"opset {_q(k)} {model.opset_imports[k]}")
    for k in sorted(model.metadata_props):
        lines.append(f"meta {_q(k)} {_q(model.metadata_props[k])}")
    for f in model.functions:
        lines.append(p.function_text(f))
    lines.append(p.graph_text(model.graph, ""))
    return "\n".join(lines) + "\n"
