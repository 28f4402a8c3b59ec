"""Validation of a model against ONNX, run once after loading and before any pass.

Lowering already refuses what the IR cannot hold (cycles, undefined or twice-defined values,
tensors whose bytes do not fit their dims and dtype); :func:`validate` adds what ONNX's schemas
say: every node against its op's schema at the model's opset (input and output counts, required
inputs, known attributes and their kinds, attribute values where a check is cheap, element types
where they are known), opset imports, and custom domains that the target does not provide.

Each error names the node, its op and the problem in one line::

    node 'node_Shape_2' (Shape): unknown attribute 'axis' (Shape 15 has: end, start)
"""

from __future__ import annotations

from collections.abc import Iterable

from ._core import AttrType, Graph, Model, Node, Value
from ._dtypes import DataType
from ._errors import InvalidModelError, UnknownDomainError, VerificationError
from ._signature import OpSignature
from ._types import TensorType
from ._verify import verify
from .lower import MAX_IR_VERSION, MAX_OPSET, op_signature, schema_domains

__all__ = ["validate", "check_opsets"]

#: Ops whose ``axis`` attribute indexes the rank of input 0: op -> how far past the last axis it may go.
_AXIS_OPS: dict[str, int] = {
    "Concat": 0, "Gather": 0, "GatherElements": 0, "Softmax": 0, "LogSoftmax": 0, "Hardmax": 0, "Split": 0,
    "LayerNormalization": 0, "ArgMax": 0, "ArgMin": 0, "TopK": 0, "Flatten": 1,
}
#: Ops whose ``axes`` attribute (older opsets) indexes input 0's rank (Unsqueeze: the output's rank).
_AXES_OPS = frozenset({
    "Squeeze", "Unsqueeze", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
})
#: Attributes that hold an element type number.
_DTYPE_ATTRS = {("Cast", "to"), ("EyeLike", "dtype"), ("RandomNormal", "dtype"), ("RandomUniform", "dtype"),
                ("RandomNormalLike", "dtype"), ("RandomUniformLike", "dtype"), ("Multinomial", "dtype")}
_KNOWN_DTYPES = frozenset(int(d) for d in DataType if d != DataType.UNDEFINED)


def validate(
    model: Model,
    *,
    known_domains: Iterable[str] | None = None,
    max_opset: int | None = None,
    target: str = "",
) -> None:
    """Check a freshly loaded model against ONNX's op schemas and the IR's invariants.

    Args:
        model: the model, as lowered (before any pass).
        known_domains: op domains besides ONNX's own that the target runtime provides (for example
            ``{"com.microsoft"}`` on onnxruntime); ``None`` accepts every domain. Domains of the
            model's local functions are always known.
        max_opset: the newest default-domain opset the target supports, if it has a limit.
        target: the target's name, for messages.

    Raises:
        InvalidModelError: naming the node, its op and the problem, in one line.
    """
    known = None if known_domains is None else frozenset("" if d == "ai.onnx" else d for d in known_domains)
    _Validator(model, known, max_opset, target).run()


def check_opsets(model: Model) -> None:
    """Check only that every ONNX op exists in the model's imported opset (a subset of :func:`validate`).

    Raises:
        InvalidModelError: naming the node, the op and the opset.
    """
    v = _Validator(model, None, None, "")
    for g in model.graph.all_graphs():
        for n in g:
            v.signature(n, model.opset_imports, _where(n, g))


def _where(n: Node, g: Graph) -> str:
    op = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
    if n.name:
        who = f"node {n.name!r} ({op})"
    else:
        first = next((o for o in n.outputs if o is not None), None)
        who = f"node ({op})" + (f" writing %{first.name}" if first is not None else "")
    parent = g.parent
    if parent is not None and parent.graph is not None:
        who += f" in subgraph {g.name or '?'!r} of {_where(parent, parent.graph)}"
    return who


def _opset(opsets: dict[str, int], domain: str) -> int | None:
    if domain == "":
        return opsets.get("", opsets.get("ai.onnx"))
    return opsets.get(domain)


def _rank(v: Value | None) -> int | None:
    t = v.type if v is not None else None
    return len(t.shape) if isinstance(t, TensorType) and t.shape is not None else None


def _dtype_name(t: int) -> str:
    try:
        return DataType(t).name
    except ValueError:
        return str(t)


class _Validator:
    def __init__(self, model: Model, known: frozenset[str] | None, max_opset: int | None, target: str) -> None:
        self.model = model
        self.known = known
        self.max_opset = max_opset
        self.target = target
        self.local = {("" if f.domain == "ai.onnx" else f.domain, f.name) for f in model.functions}
        #: Element types found for values that carry no type (by id), from their producer's schema.
        self.dtypes: dict[int, int] = {}

    def run(self) -> None:
        m = self.model
        if m.ir_version < 1:
            raise InvalidModelError(f"the model declares no IR version (ir_version {m.ir_version})")
        if m.ir_version > MAX_IR_VERSION:
            raise InvalidModelError(
                f"the model's IR version {m.ir_version} is newer than this compiler reads (up to {MAX_IR_VERSION})"
            )
        self.opsets(m.opset_imports, "the model")
        if not m.graph.outputs:
            raise InvalidModelError(f"graph {m.graph.name or 'main'!r} has no outputs: there is nothing to compute")
        for v in [*m.graph.inputs, *m.graph.outputs]:
            if isinstance(v.type, TensorType) and v.type.dtype == DataType.UNDEFINED:
                kind = "input" if v.is_graph_input() else "output"
                raise InvalidModelError(f"graph {kind} %{v.name} has no element type")
        try:
            verify(m)
        except VerificationError as e:
            raise InvalidModelError(str(e)) from None
        for g in m.graph.all_graphs():
            self.graph(g, m.opset_imports)
        for f in m.functions:
            opsets = {**m.opset_imports, **f.opset_imports}
            self.opsets(f.opset_imports, f"function {f.domain}::{f.name}")
            for g in f.graph.all_graphs():
                self.graph(g, opsets)

    def opsets(self, opsets: dict[str, int], who: str) -> None:
        for domain, version in opsets.items():
            if version < 1:
                raise InvalidModelError(f"{who} imports opset {version} of domain {domain or 'ai.onnx'!r}")
        version = _opset(opsets, "")
        if version is None:
            return
        if version > MAX_OPSET:
            raise InvalidModelError(
                f"{who} imports ONNX opset {version}, newer than this compiler knows (up to {MAX_OPSET})"
            )
        if self.max_opset is not None and version > self.max_opset:
            target = f"target {self.target}" if self.target else "the target"
            raise InvalidModelError(f"{who} imports ONNX opset {version}; {target} supports up to opset {self.max_opset}")

    def graph(self, g: Graph, opsets: dict[str, int]) -> None:
        names: set[str] = set()
        for n in g:
            where = _where(n, g)
            if n.name:
                if n.name in names:
                    raise InvalidModelError(f"{where}: another node of graph {g.name or 'main'!r} has the same name")
                names.add(n.name)
            sig = self.signature(n, opsets, where)
            if sig is not None:
                self.node(n, sig, where)

    def signature(self, n: Node, opsets: dict[str, int], where: str) -> OpSignature | None:
        """The node's schema; raises when its domain or op is not available."""
        domain = "" if n.domain == "ai.onnx" else n.domain
        if (domain, n.op_type) in self.local:
            return None
        if domain not in schema_domains():
            if self.known is not None and domain not in self.known:
                target = f"target {self.target}" if self.target else "the target"
                known = ", ".join(["ai.onnx", *sorted(self.known)])
                raise UnknownDomainError(f"{where}: domain {domain!r} is not provided by {target} (it has {known})", domain)
            if domain not in opsets:
                raise InvalidModelError(f"{where}: the model imports no opset for domain {domain!r}")
            return None
        version = _opset(opsets, domain)
        if version is None:
            what = "ONNX opset" if domain == "" else f"opset for domain {domain!r}"
            raise InvalidModelError(f"{where}: the model imports no {what}")
        sig = op_signature(n.op_type, domain, version)
        opset = f"ONNX opset {version}" if domain == "" else f"opset {version} of {domain}"
        if sig is None:
            raise InvalidModelError(f"{where}: op {n.op_type!r} is not defined in {opset}")
        if sig.deprecated:
            raise InvalidModelError(f"{where}: op {n.op_type!r} is deprecated in {opset}")
        return sig

    def node(self, n: Node, sig: OpSignature, where: str) -> None:
        op = f"{n.op_type} {sig.since_version}"
        k = len(n.inputs)
        if not sig.min_inputs <= k <= sig.max_inputs:
            raise InvalidModelError(f"{where}: {k} inputs, but {op} takes {_range(sig.min_inputs, sig.max_inputs)}")
        for i, v in enumerate(n.inputs):
            f = sig.input(i)
            if v is None and f is not None and f.option == "single":
                raise InvalidModelError(f"{where}: input {i} ({f.name}) is required but empty")
        k = len(n.outputs)
        if not sig.min_outputs <= k <= sig.max_outputs:
            raise InvalidModelError(f"{where}: {k} outputs, but {op} has {_range(sig.min_outputs, sig.max_outputs)}")
        for name, a in n.attributes.items():
            spec = sig.attributes.get(name)
            if spec is None:
                has = ", ".join(sorted(sig.attributes)) or "none"
                raise InvalidModelError(f"{where}: unknown attribute {name!r} ({op} has: {has})")
            if not a.ref_attr_name and a.type != spec.type:
                raise InvalidModelError(f"{where}: attribute {name!r} is {a.type.name}, but {op} expects {spec.type.name}")
        for spec in sig.attributes.values():
            if spec.required and spec.name not in n.attributes:
                raise InvalidModelError(f"{where}: required attribute {spec.name!r} is missing")
        self.values(n, where)
        self.types(n, sig, where)

    def values(self, n: Node, where: str) -> None:
        """Attribute values, where a check is cheap (ranks come from declared types only)."""
        attrs = n.attributes
        if n.op_type == "Constant" and len(attrs) != 1:
            raise InvalidModelError(f"{where}: a Constant needs exactly one value attribute, it has {len(attrs)}")
        for op, name in _DTYPE_ATTRS:
            if n.op_type == op and name in attrs and attrs[name].type == AttrType.INT:
                if attrs[name].value not in _KNOWN_DTYPES:
                    raise InvalidModelError(f"{where}: attribute {name!r} = {attrs[name].value} is not an element type")
        a = attrs.get("perm")
        if n.op_type == "Transpose" and a is not None and a.type == AttrType.INTS:
            perm, rank = list(a.value), _rank(n.inputs[0] if n.inputs else None)
            if sorted(perm) != list(range(len(perm))) or (rank is not None and len(perm) != rank):
                of = f" of a rank-{rank} input" if rank is not None else ""
                raise InvalidModelError(f"{where}: perm {perm} is not a permutation of the axes{of}")
        if not n.inputs:
            return
        rank = _rank(n.inputs[0])
        if rank is None:
            return
        a = attrs.get("axis")
        if n.op_type in _AXIS_OPS and a is not None and a.type == AttrType.INT:
            if not -rank <= a.value < rank + _AXIS_OPS[n.op_type]:
                raise InvalidModelError(f"{where}: axis {a.value} is out of range for a rank-{rank} input")
        a = attrs.get("axes")
        if n.op_type in _AXES_OPS and a is not None and a.type == AttrType.INTS:
            r = rank + len(a.value) if n.op_type == "Unsqueeze" else rank
            axes = [x + r if x < 0 else x for x in a.value]
            if any(not 0 <= x < r for x in axes) or len(set(axes)) != len(axes):
                raise InvalidModelError(f"{where}: axes {list(a.value)} are out of range (or repeated) for rank {r}")

    def dtype(self, v: Value) -> int | None:
        t = v.type
        if isinstance(t, TensorType):
            return int(t.dtype) if t.dtype != DataType.UNDEFINED else None
        return self.dtypes.get(id(v)) if t is None else None

    def types(self, n: Node, sig: OpSignature, where: str) -> None:
        """Element types where they are known: each input allowed, one type per type parameter."""
        bound: dict[str, tuple[int, int]] = {}
        for i, v in enumerate(n.inputs):
            f = sig.input(i)
            if v is None or f is None:
                continue
            t = self.dtype(v)
            if t is None:
                continue
            if f.tensor_types and t not in f.tensor_types:
                raise InvalidModelError(
                    f"{where}: input {i} ({f.name}, %{v.name}) is {_dtype_name(t)}, which {n.op_type} does not take there"
                )
            if f.type_param and f.homogeneous:
                first = bound.setdefault(f.type_param, (t, i))
                if first[0] != t:
                    raise InvalidModelError(
                        f"{where}: inputs {first[1]} and {i} share type {f.type_param} but are "
                        f"{_dtype_name(first[0])} and {_dtype_name(t)}"
                    )
        for k, o in enumerate(n.outputs):
            f = sig.output(k)
            if o is None or f is None:
                continue
            if f.type_param and f.homogeneous and f.type_param in bound:
                expect: int | None = bound[f.type_param][0]
            else:  # a fixed type, or a parameter that allows one type only (Shape's int64)
                expect = next(iter(f.tensor_types)) if len(f.tensor_types) == 1 else None
            if expect is None:
                continue
            declared = self.dtype(o)
            if declared is None:
                if o.type is None:
                    self.dtypes[id(o)] = expect
            elif declared != expect:
                raise InvalidModelError(
                    f"{where}: output {k} (%{o.name}) is declared {_dtype_name(declared)}, "
                    f"but {n.op_type} makes {_dtype_name(expect)}"
                )


def _range(lo: int, hi: int) -> str:
    if lo == hi:
        return f"exactly {lo}"
    if hi >= 2**31 - 1:
        return f"at least {lo}"
    return f"{lo} to {hi}"
