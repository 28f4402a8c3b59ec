"""Lowering: ONNX protobuf → IR. One of the two modules allowed to import ``onnx``.

Lowering keeps everything the emitter needs to give the model back unchanged: value, node and
initializer names, opsets, custom domains, subgraphs reading outer-scope values, local functions,
metadata and doc strings. Initializer data is not copied into numpy: tensors keep their raw bytes,
and tensors in external data files stay on disk until a pass reads them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ._core import Attr, AttrType, Function, Graph, Model, Node, Value
from ._dtypes import DataType
from ._errors import DuplicateNameError, IRError, InvalidModelError, ModelLoadError, UndefinedValueError
from ._signature import AttrSpec, FormalParam, OpSignature
from ._tensor import ExternalLocation, Tensor
from ._types import (
    MapType, OpaqueType, OptionalType, SequenceType, SparseTensorType, TensorType, Type,
)

__all__ = ["load", "from_onnx", "infer_shapes", "op_signature", "schema_domains", "MAX_IR_VERSION", "MAX_OPSET"]


def load(path: str | os.PathLike[str]) -> Model:
    """Read an ONNX file into the IR; external data stays on disk until used.

    Raises:
        ModelLoadError: the file is missing, truncated or not an ONNX model.
        InvalidModelError: the model is malformed (names the node or value).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX model (no graph; is the file truncated or of another format?)")
    return from_onnx(proto, base_dir=os.path.dirname(os.path.abspath(path)))


def from_onnx(proto: onnx.ModelProto, *, base_dir: str = "", tensors: list[Tensor] | None = None) -> Model:
    """Lower a ``ModelProto``. ``base_dir`` resolves relative external data locations; with
    ``tensors`` (:func:`ir.emit.to_onnx_referencing`'s list) the tensors it marked are those objects."""
    if not isinstance(proto, onnx.ModelProto):
        raise ModelLoadError(f"expected an onnx.ModelProto, got {type(proto).__name__}")
    bad = _invalid_utf8(proto, "model")
    if bad is not None:
        raise ModelLoadError(f"{bad} is not valid UTF-8 (is the file corrupted?)")
    lw = _Lowerer(base_dir, tensors)
    opsets: dict[str, int] = {}
    for op in proto.opset_import:
        opsets[op.domain] = op.version
    functions = [lw.function(f) for f in proto.functions]
    graph = lw.graph(proto.graph, ())
    m = Model(
        graph,
        ir_version=proto.ir_version,
        opset_imports=opsets,
        producer_name=proto.producer_name,
        producer_version=proto.producer_version,
        domain=proto.domain,
        model_version=proto.model_version,
        doc_string=proto.doc_string,
        functions=functions,
    )
    m.metadata_props = {p.key: p.value for p in proto.metadata_props}
    if len(proto.training_info):
        m.extra["training_info"] = [t.SerializeToString() for t in proto.training_info]
    if len(getattr(proto, "configuration", ())):
        m.extra["configuration"] = [c.SerializeToString() for c in proto.configuration]
    return m


def _invalid_utf8(msg: Any, path: str) -> str | None:
    """Where ``msg`` holds a string field that is not UTF-8 (protobuf then hands out bytes), or None."""
    # Only string and message fields are read, so tensor data (bytes, numbers) is never copied.
    fields = _TEXT_FIELDS.get(msg.DESCRIPTOR)
    if fields is None:
        fields = _TEXT_FIELDS[msg.DESCRIPTOR] = [
            fd for fd in msg.DESCRIPTOR.fields if fd.type in (_STRING, _MESSAGE)
        ]
    for fd in fields:
        if fd.is_repeated:
            val = getattr(msg, fd.name)
            if not len(val):
                continue
        elif msg.HasField(fd.name):
            val = getattr(msg, fd.name)
        else:
            continue
        if fd.type == _STRING:
            for i, s in enumerate(val if fd.is_repeated else (val,)):
                if type(s) is bytes:
                    return f"{path}.{fd.name}{f'[{i}]' if fd.is_repeated else ''} ({s[:40]!r})"
        else:
            for i, m in enumerate(val if fd.is_repeated else (val,)):
                found = _invalid_utf8(m, "")  # the path is only spelled out on failure
                if found is not None:
                    name = getattr(m, "name", "") if fd.is_repeated else ""
                    label = f"[{i}]" + (f"{{{name}}}" if isinstance(name, str) and name else "")
                    return f"{path}.{fd.name}{label if fd.is_repeated else ''}{found}"
    return None


_TEXT_FIELDS: dict[Any, list[Any]] = {}
_STRING = 9  # FieldDescriptor.TYPE_STRING
_MESSAGE = 11  # FieldDescriptor.TYPE_MESSAGE


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


class _Lowerer:
    def __init__(self, base_dir: str, tensors: list[Tensor] | None = None) -> None:
        self.base_dir = base_dir
        self.tensors = tensors

    # -- tensors and types ----------------------------------------------------------------
    def tensor(self, tp: onnx.TensorProto, where: str) -> Tensor:
        dtype = DataType.from_int(tp.data_type, where=where)
        shape = tuple(int(d) for d in tp.dims)
        if any(d < 0 for d in shape):
            raise InvalidModelError(f"{where}: tensor has a negative dimension {list(shape)}")
        if dtype == DataType.UNDEFINED:
            raise InvalidModelError(f"{where}: tensor has no element type (data_type 0)")
        if self.tensors is not None and tp.data_location == onnx.TensorProto.EXTERNAL:
            shared = self.referenced(tp, dtype, shape, where)
            if shared is not None:
                return shared
        try:
            if tp.data_location == onnx.TensorProto.EXTERNAL:
                t = Tensor.from_external(self.external(tp, dtype, shape, where), dtype, shape, name=tp.name)
            elif tp.HasField("raw_data") and dtype != DataType.STRING:
                t = Tensor.from_raw(tp.raw_data, dtype, shape, name=tp.name)
            elif dtype == DataType.STRING:
                t = Tensor(self.strings(tp, shape, where), dtype=dtype, name=tp.name)
            else:
                t = Tensor(self.typed_data(tp, dtype, shape, where), dtype=dtype, name=tp.name)
        except InvalidModelError:
            raise
        except IRError as e:  # the tensor's own checks (data size, external file): say where it is
            raise InvalidModelError(f"{where}: {e}") from None
        t.doc_string = tp.doc_string
        t.metadata_props = {p.key: p.value for p in tp.metadata_props}
        return t

    def referenced(self, tp: onnx.TensorProto, dtype: DataType, shape: tuple[int, ...], where: str) -> Tensor | None:
        """The tensor of :attr:`tensors` that ``tp`` names (:func:`ir.emit.to_onnx_referencing`), if any."""
        from .emit import REFERENCE_LOCATION

        loc = next((e.value for e in tp.external_data if e.key == "location"), "")
        if not loc.startswith(REFERENCE_LOCATION):
            return None
        assert self.tensors is not None
        t = self.tensors[int(loc[len(REFERENCE_LOCATION):])]
        if t.dtype != dtype or t.shape != shape:
            raise IRError(f"{where}: referenced tensor {t!r} is not {dtype.name}{list(shape)}")
        return t

    def external(self, tp: onnx.TensorProto, dtype: DataType, shape: tuple[int, ...], where: str) -> ExternalLocation:
        info = {e.key: e.value for e in tp.external_data}
        if "location" not in info:
            raise InvalidModelError(f"{where}: external tensor has no location")
        rel = info["location"]
        norm = os.path.normpath(rel)
        if os.path.isabs(rel) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise InvalidModelError(f"{where}: external data location {rel!r} is outside the model's folder")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise InvalidModelError(f"{where}: external data offset/length are not integers ({info})") from None
        if dtype == DataType.STRING:
            raise InvalidModelError(f"{where}: a string tensor cannot live in external data")
        expected = (_size(shape) * dtype.bitwidth + 7) // 8
        if offset < 0 or ("length" in info and length != expected):
            raise InvalidModelError(
                f"{where}: external data at offset {offset}, length {length} does not fit "
                f"{dtype.name}{list(shape)} ({expected} bytes)"
            )
        return ExternalLocation(os.path.join(self.base_dir, rel), offset, length)

    @staticmethod
    def strings(tp: onnx.TensorProto, shape: tuple[int, ...], where: str) -> np.ndarray:
        if len(tp.string_data) != _size(shape):
            raise InvalidModelError(f"{where}: {len(tp.string_data)} strings for a tensor of shape {list(shape)}")
        return np.array(list(tp.string_data), dtype=object).reshape(shape)

    @staticmethod
    def typed_data(tp: onnx.TensorProto, dtype: DataType, shape: tuple[int, ...], where: str) -> np.ndarray:
        # Count the values first: numpy_helper would build (or fail to build) a huge array.
        field = _TYPED_FIELD.get(tp.data_type)
        if field is not None:
            have, size = len(getattr(tp, field)), _size(shape)
            if dtype in (DataType.COMPLEX64, DataType.COMPLEX128):
                size *= 2  # real and imaginary parts
            if have != size:
                raise InvalidModelError(f"{where}: {have} values of data for {dtype.name}{list(shape)}")
        try:
            return numpy_helper.to_array(tp)
        except Exception as e:  # onnx raises ValueError, TypeError... on malformed data
            raise InvalidModelError(f"{where}: cannot decode tensor data ({e})") from None

    def type(self, tp: onnx.TypeProto, where: str) -> Type | None:
        which = tp.WhichOneof("value")
        den = tp.denotation
        if which == "tensor_type":
            tt = tp.tensor_type
            return TensorType(DataType.from_int(tt.elem_type, where=where), self.shape(tt), den)
        if which == "sparse_tensor_type":
            st = tp.sparse_tensor_type
            return SparseTensorType(DataType.from_int(st.elem_type, where=where), self.shape(st), den)
        if which == "sequence_type":
            e = tp.sequence_type.elem_type
            return SequenceType(self.type(e, where) if e.ByteSize() else None, den)
        if which == "optional_type":
            e = tp.optional_type.elem_type
            return OptionalType(self.type(e, where) if e.ByteSize() else None, den)
        if which == "map_type":
            mt = tp.map_type
            return MapType(DataType.from_int(mt.key_type, where=where), self.type(mt.value_type, where), den)
        if which == "opaque_type":
            return OpaqueType(tp.opaque_type.domain, tp.opaque_type.name, den)
        return None

    @staticmethod
    def shape(tt: Any) -> tuple | None:
        if not tt.HasField("shape"):
            return None
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            kind = d.WhichOneof("value")
            dims.append(d.dim_value if kind == "dim_value" else d.dim_param if kind == "dim_param" else None)
        return tuple(dims)

    # -- attributes -----------------------------------------------------------------------
    def attr(self, ap: onnx.AttributeProto, scopes: tuple[dict[str, Value], ...], where: str) -> Attr:
        kind = AttrType(ap.type) if ap.type in AttrType._value2member_map_ else AttrType.UNDEFINED
        at = f"{where}, attribute {ap.name!r}"
        if ap.ref_attr_name:
            return Attr(ap.name, kind, None, ref_attr_name=ap.ref_attr_name, doc_string=ap.doc_string)
        if kind == AttrType.UNDEFINED:
            kind = _guess_kind(ap, at)
        if kind == AttrType.FLOAT:
            v: Any = ap.f
        elif kind == AttrType.INT:
            v = ap.i
        elif kind == AttrType.STRING:
            v = _decode(ap.s)
        elif kind == AttrType.TENSOR:
            v = self.tensor(ap.t, at)
        elif kind == AttrType.GRAPH:
            v = self.graph(ap.g, scopes)
        elif kind == AttrType.FLOATS:
            v = list(ap.floats)
        elif kind == AttrType.INTS:
            v = list(ap.ints)
        elif kind == AttrType.STRINGS:
            v = [_decode(s) for s in ap.strings]
        elif kind == AttrType.TENSORS:
            v = [self.tensor(t, at) for t in ap.tensors]
        elif kind == AttrType.GRAPHS:
            v = [self.graph(g, scopes) for g in ap.graphs]
        elif kind == AttrType.SPARSE_TENSOR:
            v = self.sparse(ap.sparse_tensor, at)
        elif kind == AttrType.SPARSE_TENSORS:
            v = [self.sparse(s, at) for s in ap.sparse_tensors]
        elif kind == AttrType.TYPE_PROTO:
            v = self.type(ap.tp, at)
        elif kind == AttrType.TYPE_PROTOS:
            v = [self.type(t, at) for t in ap.type_protos]
        else:
            raise InvalidModelError(f"{at}: attribute has no value")
        return Attr(ap.name, kind, v, doc_string=ap.doc_string)

    def sparse(self, sp: onnx.SparseTensorProto, where: str) -> tuple[Tensor, Tensor, list[int]]:
        return (self.tensor(sp.values, where), self.tensor(sp.indices, where), list(sp.dims))

    # -- graphs ---------------------------------------------------------------------------
    def graph(self, gp: onnx.GraphProto, outer: tuple[dict[str, Value], ...]) -> Graph:
        g = Graph(name=gp.name, doc_string=gp.doc_string)
        g.metadata_props = {p.key: p.value for p in gp.metadata_props}
        scope: dict[str, Value] = {}
        scopes = (scope, *outer)
        gname = gp.name or "main"

        def define(name: str, value: Value, by: str) -> None:
            if name in scope:
                raise DuplicateNameError(f"value name %{name} is defined twice in graph {gname!r} (again by {by})")
            scope[name] = value

        for vi in gp.input:
            v = Value(vi.name, self.type(vi.type, f"input %{vi.name}"), doc_string=vi.doc_string)
            v.metadata_props = {p.key: p.value for p in vi.metadata_props}
            define(vi.name, v, "a graph input")
            g.add_input(v)
        for tp in gp.initializer:
            t = self.tensor(tp, f"initializer %{tp.name}")
            if tp.name in scope and scope[tp.name].is_graph_input():
                v = scope[tp.name]  # an input with a default value (IR version < 4 style)
                v.const_value = t
                g.initializers[tp.name] = v
                continue
            v = Value(tp.name, TensorType(t.dtype, t.shape), const_value=t)
            define(tp.name, v, "an initializer")
            g.add_initializer(v)
        if len(gp.sparse_initializer):
            sparse: dict[str, Any] = {}
            for sp in gp.sparse_initializer:
                name = sp.values.name
                v = Value(name)
                v._graph = g
                define(name, v, "a sparse initializer")
                sparse[name] = (v, sp.SerializeToString())
            g.extra["sparse_initializers"] = sparse
        if len(gp.quantization_annotation):
            g.extra["quantization_annotation"] = [q.SerializeToString() for q in gp.quantization_annotation]

        pending: list[tuple[onnx.NodeProto, list[Value | None], str]] = []
        for i, np_ in enumerate(gp.node):
            label = _label(np_, i)
            outs: list[Value | None] = []
            for name in np_.output:
                if not name:
                    outs.append(None)
                    continue
                v = Value(name)
                define(name, v, f"node {label}")
                outs.append(v)
            pending.append((np_, outs, label))

        for np_, outs, label in pending:
            ins: list[Value | None] = []
            for k, name in enumerate(np_.input):
                ins.append(None if not name else _lookup(scopes, name, f"node {label}: input {k} reads %{name}"))
            attrs = [self.attr(a, scopes, f"node {label}") for a in np_.attribute]
            if len({a.name for a in attrs}) != len(attrs):
                names = [a.name for a in attrs]
                twice = next(n for k, n in enumerate(names) if n in names[:k])
                raise InvalidModelError(f"node {label}: attribute {twice!r} is given twice")
            node = Node(
                np_.op_type, ins, attrs, domain=np_.domain, name=np_.name, outputs=outs,
                overload=getattr(np_, "overload", ""), doc_string=np_.doc_string,
            )
            node.metadata_props = {p.key: p.value for p in np_.metadata_props}
            g.append(node)

        for vi in gp.value_info:
            v = scope.get(vi.name)
            if v is not None:
                t = self.type(vi.type, f"value %{vi.name}")
                if t is not None:
                    v.type = t
                if vi.doc_string:
                    v.doc_string = vi.doc_string
                if len(vi.metadata_props):
                    v.metadata_props.update((p.key, p.value) for p in vi.metadata_props)
        for vi in gp.output:
            v = _lookup(scopes, vi.name, f"graph {gname!r}: output reads %{vi.name}") if vi.name else None
            if v is None:
                raise InvalidModelError(f"graph {gname!r}: an output has an empty name")
            t = self.type(vi.type, f"output %{vi.name}")
            if t is not None and (v.name in scope or v.type is None):
                v.type = t
            if vi.doc_string:
                v.doc_string = vi.doc_string
            if len(vi.metadata_props):
                v.metadata_props.update((p.key, p.value) for p in vi.metadata_props)
            g.outputs.append(v)

        if not _in_order(g):
            g.sort()
        return g

    def function(self, fp: onnx.FunctionProto) -> Function:
        gp = onnx.GraphProto(name=fp.name)
        gp.input.extend(onnx.ValueInfoProto(name=n) for n in fp.input)
        gp.output.extend(onnx.ValueInfoProto(name=n) for n in fp.output)
        gp.node.extend(fp.node)
        gp.value_info.extend(getattr(fp, "value_info", ()))
        graph = self.graph(gp, ())
        where = f"function {fp.domain}::{fp.name}"
        f = Function(
            fp.domain, fp.name, graph,
            attributes=list(fp.attribute),
            attribute_defaults=[self.attr(a, (), where) for a in fp.attribute_proto],
            opset_imports={o.domain: o.version for o in fp.opset_import},
            overload=getattr(fp, "overload", ""),
            doc_string=fp.doc_string,
        )
        f.metadata_props = {p.key: p.value for p in getattr(fp, "metadata_props", ())}
        return f


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


#: The ``TensorProto`` field holding each element type's values when there is no ``raw_data``.
_TYPED_FIELD: dict[int, str] = {
    **{t: "float_data" for t in (onnx.TensorProto.FLOAT, onnx.TensorProto.COMPLEX64)},
    **{t: "double_data" for t in (onnx.TensorProto.DOUBLE, onnx.TensorProto.COMPLEX128)},
    onnx.TensorProto.INT64: "int64_data",
    **{t: "uint64_data" for t in (onnx.TensorProto.UINT32, onnx.TensorProto.UINT64)},
    **{t: "int32_data" for t in (
        onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
        onnx.TensorProto.UINT8, onnx.TensorProto.BOOL, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
    )},
}


def _label(np_: onnx.NodeProto, i: int) -> str:
    op = f"{np_.domain}::{np_.op_type}" if np_.domain not in ("", "ai.onnx") else np_.op_type
    if np_.name:
        return f"{op} {np_.name!r}"
    return f"{op} #{i}" + (f" -> %{np_.output[0]}" if len(np_.output) and np_.output[0] else "")


def _lookup(scopes: tuple[dict[str, Value], ...], name: str, what: str) -> Value:
    for s in scopes:
        v = s.get(name)
        if v is not None:
            return v
    raise UndefinedValueError(f"{what}, which nothing defines")


def _in_order(g: Graph) -> bool:
    seen: set[int] = set()
    for n in g:
        for v in n.inputs:
            if v is not None and v.producer() is not None and v.producer().graph is g and id(v.producer()) not in seen:
                return False
        for sub in n.subgraphs():
            for v in sub.captured_values():
                p = v.producer()
                if p is not None and p.graph is g and id(p) not in seen:
                    return False
        seen.add(id(n))
    return True


def _guess_kind(ap: onnx.AttributeProto, where: str) -> AttrType:
    for field, kind in [
        ("floats", AttrType.FLOATS), ("ints", AttrType.INTS), ("strings", AttrType.STRINGS),
        ("tensors", AttrType.TENSORS), ("graphs", AttrType.GRAPHS),
    ]:
        if len(getattr(ap, field)):
            return kind
    for field, kind in [
        ("t", AttrType.TENSOR), ("g", AttrType.GRAPH), ("sparse_tensor", AttrType.SPARSE_TENSOR),
        ("tp", AttrType.TYPE_PROTO),
    ]:
        if ap.HasField(field):
            return kind
    if ap.HasField("s"):
        return AttrType.STRING
    if ap.HasField("f"):
        return AttrType.FLOAT
    if ap.HasField("i"):
        return AttrType.INT
    raise InvalidModelError(f"{where}: attribute has no value")



def infer_shapes(model: Model, *, data_prop: bool = True) -> int:
    """Fill in value types with ONNX's shape inference; returns how many values got a new type.

    Tensors of 1 KiB or more are emitted as unread external references, so inference sees their
    types but the data is never copied. Existing types are replaced only by more precise ones.
    """
    from .emit import _Emitter

    def fake_external(t: Tensor) -> tuple[str, int, int] | None:
        return None if t.nbytes < 1024 or t.dtype == DataType.STRING else ("__not_loaded__", 0, t.nbytes)

    proto = _Emitter(fake_external).model(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=data_prop)
    except Exception:  # inference is best effort: a model it cannot handle keeps its types
        return 0
    lw = _Lowerer("")
    changed = 0

    def apply(g: Graph, gp: onnx.GraphProto) -> int:
        n = 0
        by_name: dict[str, Value] = {}
        for node in g:
            for o in node.outputs:
                if o is not None:
                    by_name[o.name] = o
        for vi in list(gp.value_info) + list(gp.output):
            v = by_name.get(vi.name)
            if v is None:
                continue
            t = lw.type(vi.type, vi.name)
            if t is not None and _more_precise(t, v.type):
                v.type = t
                n += 1
        for node, np_ in zip(g, gp.node):
            subs = node.subgraphs()
            sub_protos = [a.g for a in np_.attribute if a.type == onnx.AttributeProto.GRAPH]
            sub_protos += [x for a in np_.attribute if a.type == onnx.AttributeProto.GRAPHS for x in a.graphs]
            for sg, sgp in zip(subs, sub_protos):
                n += apply(sg, sgp)
        return n

    changed += apply(model.graph, inferred.graph)
    return changed


def _more_precise(new: Type, old: Type | None) -> bool:
    if old is None:
        return True
    if not isinstance(new, TensorType) or not isinstance(old, TensorType):
        return False
    if new.dtype != old.dtype and old.dtype != DataType.UNDEFINED:
        return False
    if old.shape is None:
        return new.shape is not None
    if new.shape is None or len(new.shape) != len(old.shape):
        return False
    better = False
    for a, b in zip(new.shape, old.shape):
        if isinstance(b, int):
            if a != b:
                return False
        elif isinstance(a, int) or (a is not None and b is None):
            better = True
    return better


# -- op schemas, for ir.validate ----------------------------------------------------------------

#: The newest IR version and opset of the installed ``onnx``: models above them cannot be checked.
MAX_IR_VERSION: int = onnx.IR_VERSION
MAX_OPSET: int = onnx.defs.onnx_opset_version()

_OPTION = {
    onnx.defs.OpSchema.FormalParameterOption.Single: "single",
    onnx.defs.OpSchema.FormalParameterOption.Optional: "optional",
    onnx.defs.OpSchema.FormalParameterOption.Variadic: "variadic",
}
_TENSOR_TYPE = {f"tensor({name.lower()})": int(num) for name, num in onnx.TensorProto.DataType.items()}


def schema_domains() -> frozenset[str]:
    """The domains whose ops ONNX's schemas define (``""``, ``ai.onnx.ml``, ...); ``""`` is ``ai.onnx``."""
    return _SCHEMA_DOMAINS


_SCHEMA_DOMAINS = frozenset(s.domain for s in onnx.defs.get_all_schemas_with_history())


@functools.lru_cache(maxsize=None)
def op_signature(op_type: str, domain: str, version: int) -> OpSignature | None:
    """The signature of ``domain::op_type`` in opset ``version`` of its domain, or ``None``.

    ``None`` when ONNX's schemas do not define the op at that version (or the domain is not one
    of :func:`schema_domains`). Lookups are cached: validating a model costs one per op type.
    """
    try:
        s = onnx.defs.get_schema(op_type, version, "" if domain == "ai.onnx" else domain)
    except onnx.defs.SchemaError:
        return None

    def formal(p: Any) -> FormalParam:
        types = frozenset(_TENSOR_TYPE[t] for t in p.types if t in _TENSOR_TYPE)
        param = p.type_str if p.type_str not in _TENSOR_TYPE and "(" not in p.type_str else ""
        return FormalParam(p.name, _OPTION.get(p.option, "single"), param, types, bool(p.is_homogeneous),
                           int(p.min_arity))

    return OpSignature(
        domain=s.domain,
        op_type=s.name,
        since_version=int(s.since_version),
        inputs=tuple(formal(p) for p in s.inputs),
        outputs=tuple(formal(p) for p in s.outputs),
        min_inputs=int(s.min_input),
        max_inputs=int(s.max_input),
        min_outputs=int(s.min_output),
        max_outputs=int(s.max_output),
        attributes={
            name: AttrSpec(name, AttrType(int(a.type)), bool(a.required)) for name, a in s.attributes.items()
        },
        deprecated=bool(s.deprecated),
    )
