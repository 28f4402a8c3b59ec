"""Emission: IR → ONNX protobuf, and saving to disk. One of the two modules allowed to import ``onnx``.

Saving is atomic (temporary files, then rename) so an interrupted save never leaves a broken
model. Large models go to external data: tensors still backed by an external file are streamed
from it in chunks, never through numpy, or (``share_external_data``, for temporary models) not
written at all: the saved model references the file they live in.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import onnx

from ._core import Attr, AttrType, Function, Graph, Model, Node, Value
from ._dtypes import DataType
from ._errors import IRError
from ._tensor import Tensor
from ._types import (
    MapType, OpaqueType, OptionalType, SequenceType, SparseTensorType, TensorType, Type,
)

__all__ = ["to_onnx", "to_onnx_sharing", "to_onnx_referencing", "save", "Snapshot", "TWO_GB"]

TWO_GB = 2**31
_ALIGN = 4096
_CHUNK = 64 * 2**20

# A writer takes a tensor and returns (location, offset, length) when it stored it externally.
_Writer = Callable[[Tensor], "tuple[str, int, int] | None"]


def to_onnx(model: Model) -> onnx.ModelProto:
    """Emit a ``ModelProto`` with all tensor data inline."""
    return _Emitter(None).model(model)


_SHARED_LOCATION = "__ir_shared__/"


def to_onnx_sharing(model: Model, share: Callable[[Tensor], bool]) -> tuple[onnx.ModelProto, dict[str, Tensor]]:
    """Emit a ``ModelProto`` without the data of the main graph's initializers that ``share`` picks.

    Those initializers are marked external (location ``__ir_shared__/<i>``, no file behind it) and
    returned by name, for a runtime that takes initializers from memory (onnxruntime's
    ``SessionOptions.add_external_initializers``): the weights are then neither copied into the
    protobuf nor parsed back out of its bytes. Tensors elsewhere (node attributes, functions,
    subgraphs) stay inline.
    """
    picked = {id(v.const_value) for v in model.graph.initializers.values()
              if v.const_value is not None and v.const_value.dtype != DataType.STRING and share(v.const_value)}
    kept: list[Tensor] = []

    def keep(t: Tensor) -> tuple[str, int, int] | None:
        if id(t) not in picked:
            return None
        kept.append(t)
        return f"{_SHARED_LOCATION}{len(kept) - 1}", 0, t.nbytes

    proto = _Emitter(keep).model(model)
    shared: dict[str, Tensor] = {}
    for tp in proto.graph.initializer:
        i = _shared_index(tp)
        if i is not None:
            shared[tp.name] = kept[i]
    # The same Tensor object may also sit in an attribute, a subgraph or a function: those stay inline.
    for tp in _all_tensor_protos(proto, main_initializers=False):
        i = _shared_index(tp)
        if i is not None:
            tp.raw_data = bytes(kept[i].raw_bytes())
            del tp.external_data[:]
            tp.data_location = onnx.TensorProto.DEFAULT
    return proto, shared


#: The location naming tensor ``i`` of :func:`to_onnx_referencing`'s list (no file behind it).
REFERENCE_LOCATION = "__ir_reference__/"


def to_onnx_referencing(model: Model) -> tuple[onnx.ModelProto, list[Tensor]]:
    """Emit a ``ModelProto`` whose tensors carry no data, each naming its :class:`Tensor` instead.

    Every non-string tensor (initializers, attributes, subgraphs, functions) is marked external with
    location ``__ir_reference__/<i>``, ``i`` its index in the returned list. Lowering the proto with
    that list (:func:`ir.lower.from_onnx`'s ``tensors``) gives back a model that shares the tensors:
    :func:`ir.copy_model`. Building it costs the model's structure, not its weights.
    """
    kept: list[Tensor] = []

    def keep(t: Tensor) -> tuple[str, int, int] | None:
        if t.dtype == DataType.STRING:
            return None
        kept.append(t)
        return f"{REFERENCE_LOCATION}{len(kept) - 1}", 0, t.nbytes

    return _Emitter(keep).model(model), kept


def _shared_index(tp: onnx.TensorProto) -> int | None:
    if tp.data_location != onnx.TensorProto.EXTERNAL:
        return None
    loc = {e.key: e.value for e in tp.external_data}.get("location", "")
    return int(loc[len(_SHARED_LOCATION):]) if loc.startswith(_SHARED_LOCATION) else None


def save(
    model: Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    location: str | None = None,
    size_threshold: int = 1024,
    share_external_data: bool = False,
) -> None:
    """Write ``model`` to ``path`` atomically.

    Args:
        model: the model.
        path: output ``.onnx`` path.
        external_data: ``True`` to put tensors of ``size_threshold`` bytes or more in a data file
            beside the model, ``False`` to keep them inline, ``None`` (default) to do so only when
            the model would exceed protobuf's 2 GB limit.
        location: data file name, relative to the model's folder (default ``<model file>.data``).
        size_threshold: smallest tensor, in bytes, that goes to the data file.
        share_external_data: with ``external_data``, tensors still backed by an external file are
            not copied: the model references that file, hard-linked into the model's folder as
            ``<model file>.shared<k>.data`` (a link costs no space and no time; onnxruntime reads
            external data from the model's folder only). Where a link cannot be made (another
            file system) the tensor is copied as usual. For temporary models (an onnxruntime
            session's): the saved model is valid only while the source file is unchanged, and the
            links are written in place, outside the atomic rename.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if external_data is None:
        external_data = _tensor_bytes(model) > TWO_GB - 64 * 2**20
    mode = _umask_mode()
    fd, tmp_model = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=folder)
    os.close(fd)
    tmp_data = None
    try:
        # mkstemp creates files 0600; the written files get what the user's umask gives, as open() would.
        os.chmod(tmp_model, mode)
        if external_data:
            location = location or os.path.basename(path) + ".data"
            fd, tmp_data = tempfile.mkstemp(prefix=".tmp-", suffix=".data", dir=folder)
            os.chmod(tmp_data, mode)
            links = _Links(folder, os.path.basename(path)) if share_external_data else None
            with os.fdopen(fd, "wb") as data_file:
                # ONNX's checker, which onnxruntime runs on subgraphs, refuses external data in a
                # file with several hard links: subgraph tensors are copied, never linked.
                sub = _external_writer(data_file, location, size_threshold) if links is not None else None
                proto = _Emitter(_external_writer(data_file, location, size_threshold, links), sub).model(model)
                data_file.flush()
                os.fsync(data_file.fileno())
        else:
            proto = _Emitter(None).model(model)
        if proto.ByteSize() >= TWO_GB:
            raise IRError("the model exceeds 2 GB inline; save it with external_data=True")
        with open(tmp_model, "wb") as f:
            f.write(proto.SerializeToString())
        if tmp_data is not None:
            os.replace(tmp_data, os.path.join(folder, location))  # type: ignore[arg-type]
            tmp_data = None
        os.replace(tmp_model, path)
    finally:
        for p in (tmp_model, tmp_data):
            if p is not None and os.path.exists(p):
                os.unlink(p)


def _umask_mode() -> int:
    """``0o666`` less the process's umask: the mode ``open(path, "w")`` would give a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _tensor_bytes(model: Model) -> int:
    total = 0
    graphs = [model.graph] + [f.graph for f in model.functions]
    for root in graphs:
        for g in root.all_graphs():
            total += sum(v.const_value.nbytes for v in g.initializers.values() if v.const_value is not None)
            for n in g:
                for a in n.attributes.values():
                    if a.type == AttrType.TENSOR and a.value is not None:
                        total += a.value.nbytes
    return total


class _Links:
    """Hard links in ``folder`` to the external data files that a saved model references in place."""

    def __init__(self, folder: str, model_name: str) -> None:
        self.folder, self.model_name = folder, model_name
        self.names: dict[str, str | None] = {}

    def location(self, path: str) -> str | None:
        """The location, relative to the folder, of a link to ``path`` (None: cannot link)."""
        real = os.path.realpath(path)
        if real not in self.names:
            self.names[real] = self._link(real)
        return self.names[real]

    def _link(self, real: str) -> str | None:
        if os.path.dirname(real) == os.path.realpath(self.folder):
            return os.path.basename(real)  # already beside the model
        for k in range(len(self.names), len(self.names) + 1000):
            name = f"{self.model_name}.shared{k}.data"
            dst = os.path.join(self.folder, name)
            try:
                os.link(real, dst)
                return name
            except FileExistsError:
                if os.path.samefile(real, dst):
                    return name
            except OSError:  # another file system, or links not allowed: copy instead
                return None
        return None


def _external_writer(f: Any, location: str, threshold: int, links: _Links | None = None) -> _Writer:
    def write(t: Tensor) -> tuple[str, int, int] | None:
        if t.dtype == DataType.STRING or t.nbytes < threshold:
            return None
        ext = t.external
        if ext is not None and links is not None:
            linked = links.location(ext.path)
            if linked is not None:
                return linked, ext.offset, ext.length
        pos = f.tell()
        pad = (-pos) % _ALIGN
        if pad:
            f.write(b"\0" * pad)
            pos += pad
        if ext is not None:
            # Stream from the source file: the data never passes through numpy or a full copy.
            with open(ext.path, "rb") as src:
                src.seek(ext.offset)
                left = ext.length
                while left:
                    chunk = src.read(min(_CHUNK, left))
                    if not chunk:
                        raise IRError(f"tensor {t.name!r}: external data file {ext.path} ended early")
                    f.write(chunk)
                    left -= len(chunk)
        else:
            f.write(t.raw_bytes())
        return location, pos, f.tell() - pos

    return write


class _Emitter:
    def __init__(self, writer: _Writer | None, sub_writer: _Writer | None = None) -> None:
        self.writer = writer
        #: The writer for tensors inside subgraphs (If branches, loop bodies), when it differs.
        self.sub_writer = sub_writer

    def subgraph(self, g: Graph) -> onnx.GraphProto:
        if self.sub_writer is None:
            return self.graph(g)
        outer, self.writer = self.writer, self.sub_writer
        try:
            return self.graph(g)
        finally:
            self.writer = outer

    def model(self, m: Model) -> onnx.ModelProto:
        p = onnx.ModelProto()
        p.ir_version = m.ir_version
        for domain in m.opset_imports:
            p.opset_import.add(domain=domain, version=m.opset_imports[domain])
        p.producer_name = m.producer_name
        p.producer_version = m.producer_version
        p.domain = m.domain
        p.model_version = m.model_version
        p.doc_string = m.doc_string
        _props(p.metadata_props, m.metadata_props)
        for f in m.functions:
            p.functions.append(self.function(f))
        p.graph.CopyFrom(self.graph(m.graph))
        for raw in m.extra.get("training_info", ()):
            p.training_info.add().ParseFromString(raw)
        for raw in m.extra.get("configuration", ()):
            p.configuration.add().ParseFromString(raw)
        return p

    def graph(self, g: Graph) -> onnx.GraphProto:
        p = onnx.GraphProto()
        p.name = g.name
        p.doc_string = g.doc_string
        _props(p.metadata_props, g.metadata_props)
        for v in g.inputs:
            p.input.append(self.value_info(v))
        for v in g.initializers.values():
            if v.const_value is None:
                raise IRError(f"initializer %{v.name} has no data")
            p.initializer.append(self.tensor(v.const_value, v.name))
        for v, raw in g.extra.get("sparse_initializers", {}).values():
            sp = p.sparse_initializer.add()
            sp.ParseFromString(raw)
            sp.values.name = v.name
        for raw in g.extra.get("quantization_annotation", ()):
            p.quantization_annotation.add().ParseFromString(raw)
        outputs = {id(v) for v in g.outputs}
        for n in g:
            p.node.append(self.node(n))
            for o in n.outputs:
                if o is not None and o.type is not None and id(o) not in outputs:
                    p.value_info.append(self.value_info(o))
        for v in g.outputs:
            p.output.append(self.value_info(v))
        return p

    def function(self, f: Function) -> onnx.FunctionProto:
        p = onnx.FunctionProto()
        p.domain, p.name = f.domain, f.name
        if f.overload:
            p.overload = f.overload
        p.input.extend(v.name for v in f.graph.inputs)
        p.output.extend(v.name for v in f.graph.outputs)
        p.attribute.extend(f.attributes)
        for a in f.attribute_defaults:
            p.attribute_proto.append(self.attr(a))
        for n in f.graph:
            p.node.append(self.node(n))
            for o in n.outputs:
                if o is not None and o.type is not None:
                    p.value_info.append(self.value_info(o))
        for domain in f.opset_imports:
            p.opset_import.add(domain=domain, version=f.opset_imports[domain])
        p.doc_string = f.doc_string
        _props(p.metadata_props, f.metadata_props)
        return p

    def node(self, n: Node) -> onnx.NodeProto:
        p = onnx.NodeProto()
        p.op_type = n.op_type
        p.domain = n.domain
        p.name = n.name
        if n.overload:
            p.overload = n.overload
        p.doc_string = n.doc_string
        p.input.extend("" if v is None else v.name for v in n.inputs)
        p.output.extend("" if v is None else v.name for v in n.outputs)
        for a in n.attributes.values():
            p.attribute.append(self.attr(a))
        _props(p.metadata_props, n.metadata_props)
        return p

    def value_info(self, v: Value) -> onnx.ValueInfoProto:
        p = onnx.ValueInfoProto()
        p.name = v.name
        if v.type is not None:
            p.type.CopyFrom(_type(v.type))
        p.doc_string = v.doc_string
        _props(p.metadata_props, v.metadata_props)
        return p

    def tensor(self, t: Tensor, name: str | None = None) -> onnx.TensorProto:
        p = onnx.TensorProto()
        p.name = t.name if name is None else name
        p.data_type = int(t.dtype)
        p.dims.extend(t.shape)
        p.doc_string = t.doc_string
        _props(p.metadata_props, t.metadata_props)
        if t.dtype == DataType.STRING:
            p.string_data.extend(
                s if isinstance(s, bytes) else str(s).encode("utf-8", "surrogateescape") for s in t.numpy().ravel()
            )
            return p
        where = self.writer(t) if self.writer is not None else None
        if where is not None:
            loc, offset, length = where
            p.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", loc), ("offset", str(offset)), ("length", str(length))):
                e = p.external_data.add()
                e.key, e.value = k, v
        else:
            p.raw_data = bytes(t.raw_bytes())
        return p

    def sparse(self, sp: Any) -> onnx.SparseTensorProto:
        values, indices, dims = sp
        p = onnx.SparseTensorProto()
        p.values.CopyFrom(self.tensor(values))
        p.indices.CopyFrom(self.tensor(indices))
        p.dims.extend(dims)
        return p

    def attr(self, a: Attr) -> onnx.AttributeProto:
        p = onnx.AttributeProto()
        p.name = a.name
        p.type = int(a.type)
        p.doc_string = a.doc_string
        if a.ref_attr_name:
            p.ref_attr_name = a.ref_attr_name
            return p
        k, v = a.type, a.value
        if k == AttrType.FLOAT:
            p.f = v
        elif k == AttrType.INT:
            p.i = v
        elif k == AttrType.STRING:
            p.s = _encode(v)
        elif k == AttrType.TENSOR:
            p.t.CopyFrom(self.tensor(v))
        elif k == AttrType.GRAPH:
            p.g.CopyFrom(self.subgraph(v))
        elif k == AttrType.FLOATS:
            p.floats.extend(v)
        elif k == AttrType.INTS:
            p.ints.extend(v)
        elif k == AttrType.STRINGS:
            p.strings.extend(_encode(s) for s in v)
        elif k == AttrType.TENSORS:
            p.tensors.extend(self.tensor(t) for t in v)
        elif k == AttrType.GRAPHS:
            p.graphs.extend(self.subgraph(g) for g in v)
        elif k == AttrType.SPARSE_TENSOR:
            p.sparse_tensor.CopyFrom(self.sparse(v))
        elif k == AttrType.SPARSE_TENSORS:
            p.sparse_tensors.extend(self.sparse(s) for s in v)
        elif k == AttrType.TYPE_PROTO:
            p.tp.CopyFrom(_type(v))
        elif k == AttrType.TYPE_PROTOS:
            p.type_protos.extend(_type(t) for t in v)
        else:
            raise IRError(f"attribute {a.name!r} has undefined kind")
        return p


def _encode(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")


def _props(field: Any, props: dict[str, str]) -> None:
    for k, v in props.items():
        e = field.add()
        e.key, e.value = k, v


def _shape_into(dst: Any, shape: tuple | None) -> None:
    if shape is None:
        return
    dst.shape.SetInParent()
    for d in shape:
        dim = dst.shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        elif isinstance(d, str):
            dim.dim_param = d


def _type(t: Type) -> onnx.TypeProto:
    p = onnx.TypeProto()
    if t.denotation:
        p.denotation = t.denotation
    if isinstance(t, TensorType):
        p.tensor_type.elem_type = int(t.dtype)
        _shape_into(p.tensor_type, t.shape)
    elif isinstance(t, SparseTensorType):
        p.sparse_tensor_type.elem_type = int(t.dtype)
        _shape_into(p.sparse_tensor_type, t.shape)
    elif isinstance(t, SequenceType):
        p.sequence_type.SetInParent()
        if t.elem is not None:
            p.sequence_type.elem_type.CopyFrom(_type(t.elem))
    elif isinstance(t, OptionalType):
        p.optional_type.SetInParent()
        if t.elem is not None:
            p.optional_type.elem_type.CopyFrom(_type(t.elem))
    elif isinstance(t, MapType):
        p.map_type.key_type = int(t.key)
        if t.value is not None:
            p.map_type.value_type.CopyFrom(_type(t.value))
    elif isinstance(t, OpaqueType):
        p.opaque_type.domain = t.domain
        p.opaque_type.name = t.name
    return p



_SNAPSHOT_LOCATION = "__ir_snapshot__/"


class Snapshot:
    """The model as it is now, cheap to take and written only on demand.

    The protobuf structure is built at once, but tensors of 1 KiB or more are kept by reference
    (tensors are immutable: passes replace them, never edit them), so taking a snapshot before
    every pass costs milliseconds, not a copy of the weights. :meth:`save` writes a complete model.
    """

    def __init__(self, model: Model) -> None:
        self._tensors: list[Tensor] = []

        def keep(t: Tensor) -> tuple[str, int, int] | None:
            if t.dtype == DataType.STRING or t.nbytes < 1024:
                return None
            self._tensors.append(t)
            return f"{_SNAPSHOT_LOCATION}{len(self._tensors) - 1}", 0, t.nbytes

        self._proto = _Emitter(keep).model(model)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the snapshot as an ONNX file (with a data file beside it when over 2 GB)."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self._proto)
        for tp in _all_tensor_protos(proto):
            if tp.data_location != onnx.TensorProto.EXTERNAL:
                continue
            loc = {e.key: e.value for e in tp.external_data}.get("location", "")
            if loc.startswith(_SNAPSHOT_LOCATION):
                tp.raw_data = bytes(self._tensors[int(loc[len(_SNAPSHOT_LOCATION):])].raw_bytes())
                del tp.external_data[:]
                tp.data_location = onnx.TensorProto.DEFAULT
        big = sum(t.nbytes for t in self._tensors) > TWO_GB - 64 * 2**20
        onnx.save_model(proto, os.fspath(path), save_as_external_data=big)


def _all_tensor_protos(proto: onnx.ModelProto, *, main_initializers: bool = True) -> list[onnx.TensorProto]:
    out: list[onnx.TensorProto] = []

    def graph(g: onnx.GraphProto, main: bool = False) -> None:
        if main_initializers or not main:
            out.extend(g.initializer)
        for sp in g.sparse_initializer:
            out.extend((sp.values, sp.indices))
        for n in g.node:
            nodes(n)

    def nodes(n: onnx.NodeProto) -> None:
        for a in n.attribute:
            if a.HasField("t"):
                out.append(a.t)
            out.extend(a.tensors)
            if a.HasField("g"):
                graph(a.g)
            for sub in a.graphs:
                graph(sub)

    graph(proto.graph, main=True)
    for f in proto.functions:
        for n in f.node:
            nodes(n)
    return out
