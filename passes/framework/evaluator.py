"""Evaluate one standard ONNX node on constant inputs: numpy fast paths, onnxruntime otherwise.

The fast paths cover the small ops exporters use to compute shapes (Shape, Gather, Concat,
Reshape, Slice...) and simple arithmetic, in the dtypes where numpy provably agrees with
onnxruntime. Anything else, or a case a fast path is unsure about, runs as a one-node model in
onnxruntime (CPU provider, graph optimizations off so the kernel itself runs); sessions are cached
by node signature because exporters repeat the same small node many times.

:func:`evaluate` returns ``None`` when it cannot (or must not) compute a result; callers then keep
the node.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import ir

__all__ = ["evaluate", "NONDETERMINISTIC_OPS", "attribute_key", "numpy_ops", "evaluate_with_onnxruntime"]

#: Ops whose result changes between runs: never evaluated at compile time.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)

_INTS = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
_FLOATS = (np.float16, np.float32, np.float64)
# dtypes for which numpy arithmetic matches onnxruntime's kernels bit for bit (or within rounding)
_ARITH = (np.int32, np.int64, np.float32, np.float64)
_CASTABLE = (np.bool_, *_INTS, *_FLOATS)


class _Refuse(Exception):
    """The node must not be evaluated at all (e.g. integer division by zero would crash the runtime)."""


class _Fallback(Exception):
    """The numpy path is unsure; let onnxruntime compute it."""


def evaluate(
    node: ir.Node,
    inputs: Sequence[np.ndarray | None],
    *,
    opset: int,
    ir_version: int = 10,
    use_onnxruntime: bool = True,
) -> list[np.ndarray | None] | None:
    """Compute the outputs of ``node`` given constant ``inputs``.

    Args:
        node: a standard-domain node (its inputs are ignored; ``inputs`` gives their data).
        inputs: one array per node input, ``None`` for an omitted optional input.
        opset: the default-domain opset the node is written for.
        ir_version: IR version for the one-node model built for onnxruntime.
        use_onnxruntime: fall back to onnxruntime when numpy has no path for the op.

    Returns:
        One array per node output (``None`` for omitted outputs), or ``None`` when the node
        cannot be evaluated.
    """
    if node.domain != "" or node.op_type in NONDETERMINISTIC_OPS or node.subgraphs():
        return None
    if any(a.ref_attr_name for a in node.attributes.values()):
        return None
    fn = _NUMPY.get(node.op_type)
    if fn is not None:
        try:
            with np.errstate(all="ignore"):
                results = fn(node, list(inputs), opset)
            return _finish(node, [np.asarray(r) for r in results])
        except _Refuse:
            return None
        except Exception:  # _Fallback, or numpy rejecting bad inputs: let the runtime decide
            pass
    if not use_onnxruntime:
        return None
    try:
        return evaluate_with_onnxruntime(node, inputs, opset=opset, ir_version=ir_version)
    except Exception:  # the runtime rejects the node: keep it, the model will tell at run time
        return None


def _finish(node: ir.Node, results: list[np.ndarray]) -> list[np.ndarray | None]:
    # Results are positional: result k belongs to output k, omitted outputs included.
    if any(o is not None and k >= len(results) for k, o in enumerate(node.outputs)):
        raise _Fallback("fewer results than outputs")
    return [None if o is None else results[k] for k, o in enumerate(node.outputs)]


# -- onnxruntime ----------------------------------------------------------------------------------
_SESSIONS: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_MAX_SESSIONS = 256


def attribute_key(a: ir.Attr) -> tuple[Any, ...]:
    """A hashable key equal for attributes with equal name, kind and value (tensors by content)."""
    if a.ref_attr_name:
        return (a.name, int(a.type), "@", a.ref_attr_name)
    v = a.value
    if isinstance(v, ir.Tensor):
        return (a.name, int(a.type), int(v.dtype), v.shape, hashlib.sha256(bytes(v.raw_bytes())).hexdigest())
    if isinstance(v, list):
        return (a.name, int(a.type), tuple(_hashable(x) for x in v))
    return (a.name, int(a.type), _hashable(v))


def _hashable(v: Any) -> Any:
    if isinstance(v, ir.Tensor):
        return (int(v.dtype), v.shape, hashlib.sha256(bytes(v.raw_bytes())).hexdigest())
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    try:
        hash(v)
    except TypeError:
        return repr(v)
    return v


def evaluate_with_onnxruntime(
    node: ir.Node, inputs: Sequence[np.ndarray | None], *, opset: int, ir_version: int = 10
) -> list[np.ndarray | None] | None:
    """Run ``node`` alone in onnxruntime on ``inputs``; ``None`` when a result is not a tensor.

    Raises:
        Exception: whatever onnxruntime raises for a node it cannot build or run.
    """
    import onnxruntime as ort

    inputs = list(inputs)
    while inputs and inputs[-1] is None:
        inputs.pop()  # onnxruntime reads a trailing "" input as present-but-null
    present = [(i, a) for i, a in enumerate(inputs) if a is not None]
    key = (
        node.op_type, node.overload, opset, ir_version,
        tuple(sorted(attribute_key(a) for a in node.attributes.values())),
        tuple((i, str(a.dtype), a.shape) for i, a in present),
        len(inputs), tuple(o is not None for o in node.outputs),
    )
    sess = _SESSIONS.get(key)
    if sess is None:
        g = ir.Graph(name="fold")
        ins: list[ir.Value | None] = []
        for i, a in enumerate(inputs):
            if a is None:
                ins.append(None)
                continue
            dtype = ir.DataType.from_numpy(a.dtype)
            ins.append(g.add_input(ir.Value(f"in{i}", ir.TensorType(dtype, tuple(a.shape)))))
        outs = [None if o is None else ir.Value(f"out{k}") for k, o in enumerate(node.outputs)]
        # Attr objects are only read while emitting, so the copy shares them.
        copy = ir.Node(node.op_type, ins, list(node.attributes.values()), outputs=outs, overload=node.overload)
        g.append(copy)
        g.outputs.extend(o for o in outs if o is not None)
        model = ir.Model(g, ir_version=ir_version, opset_imports={"": opset})
        so = ort.SessionOptions()
        # Run the kernel itself, not the runtime's own folding of it.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 4
        sess = ort.InferenceSession(ir.to_onnx(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
        _SESSIONS[key] = sess
        while len(_SESSIONS) > _MAX_SESSIONS:
            _SESSIONS.popitem(last=False)
    else:
        _SESSIONS.move_to_end(key)
    results = sess.run(None, {f"in{i}": a for i, a in present})
    if not all(isinstance(r, np.ndarray) for r in results):
        return None  # sequences, maps, optionals are not initializers
    it = iter(results)
    return [None if o is None else next(it) for o in node.outputs]


# -- numpy fast paths -----------------------------------------------------------------------------
_Fn = Callable[[ir.Node, list, int], list]
_NUMPY: dict[str, _Fn] = {}


def _op(*names: str) -> Callable[[_Fn], _Fn]:
    def deco(fn: _Fn) -> _Fn:
        for n in names:
            _NUMPY[n] = fn
        return fn

    return deco


def numpy_ops() -> frozenset[str]:
    """The op types that have a numpy fast path."""
    return frozenset(_NUMPY)


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    return node.attr(name, default)


def _ints(a: np.ndarray | None) -> list[int] | None:
    return None if a is None else [int(x) for x in np.asarray(a).reshape(-1)]


def _need(x: np.ndarray | None) -> np.ndarray:
    if x is None:
        raise _Fallback("missing input")
    return x


def _same_dtype(arrays: Sequence[np.ndarray], allowed: tuple[type, ...]) -> np.dtype:
    dts = {a.dtype for a in arrays}
    if len(dts) != 1:
        raise _Fallback("mixed dtypes")
    dt = next(iter(dts))
    if not any(dt == np.dtype(t) for t in allowed):
        raise _Fallback(f"dtype {dt}")
    return dt


@_op("Identity")
def _identity(node: ir.Node, xs: list, opset: int) -> list:
    return [_need(xs[0])]


@_op("Dropout")
def _dropout(node: ir.Node, xs: list, opset: int) -> list:
    x = _need(xs[0])
    training = bool(_attr(node, "is_test", 1) == 0) if opset < 7 else False
    if len(xs) > 2 and xs[2] is not None:
        training = bool(np.asarray(xs[2]).reshape(-1)[0])
    if training:
        raise _Refuse("Dropout in training mode is random")
    return [x, np.ones(x.shape, dtype=np.bool_)]


@_op("Shape")
def _shape(node: ir.Node, xs: list, opset: int) -> list:
    shape = _need(xs[0]).shape
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return [np.array(shape[start:end], dtype=np.int64)]


@_op("Size")
def _size(node: ir.Node, xs: list, opset: int) -> list:
    return [np.array(_need(xs[0]).size, dtype=np.int64)]


@_op("Gather")
def _gather(node: ir.Node, xs: list, opset: int) -> list:
    data, idx = _need(xs[0]), _need(xs[1])
    if idx.dtype not in (np.int32, np.int64):
        raise _Fallback("index dtype")
    axis = _attr(node, "axis", 0)
    axis = axis + data.ndim if axis < 0 else axis
    n = data.shape[axis]
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise _Refuse("index out of range")
    return [np.take(data, idx.astype(np.int64), axis=axis)]


def _axes(node: ir.Node, xs: list, opset: int, first_input_opset: int) -> list[int] | None:
    if opset >= first_input_opset:
        return _ints(xs[1]) if len(xs) > 1 else None
    return _attr(node, "axes", None)


@_op("Unsqueeze")
def _unsqueeze(node: ir.Node, xs: list, opset: int) -> list:
    x = _need(xs[0])
    axes = _axes(node, xs, opset, 13)
    if not axes:
        raise _Fallback("no axes")
    rank = x.ndim + len(axes)
    norm = sorted(a + rank if a < 0 else a for a in axes)
    if len(set(norm)) != len(norm) or norm[0] < 0 or norm[-1] >= rank:
        raise _Refuse("bad axes")
    return [np.expand_dims(x, tuple(norm))]


@_op("Squeeze")
def _squeeze(node: ir.Node, xs: list, opset: int) -> list:
    x = _need(xs[0])
    axes = _axes(node, xs, opset, 13)
    if axes is None:
        return [np.squeeze(x)]
    norm = tuple(a + x.ndim if a < 0 else a for a in axes)
    if any(x.shape[a] != 1 for a in norm):
        raise _Refuse("squeezing a dim that is not 1")
    return [np.squeeze(x, axis=norm)]


@_op("Concat")
def _concat(node: ir.Node, xs: list, opset: int) -> list:
    arrays = [x for x in xs if x is not None]
    if not arrays:
        raise _Fallback("no inputs")
    _same_dtype(arrays, (np.bool_, *_INTS, *_FLOATS))
    return [np.concatenate(arrays, axis=_attr(node, "axis", 0))]


@_op("Cast")
def _cast(node: ir.Node, xs: list, opset: int) -> list:
    x = _need(xs[0])
    to = ir.DataType(_attr(node, "to")).numpy()
    if not any(x.dtype == np.dtype(t) for t in _CASTABLE) or not any(to == np.dtype(t) for t in _CASTABLE):
        raise _Fallback("cast outside plain numeric types")
    if x.dtype.kind == "f" and to.kind in "iu":
        # Out-of-range and NaN conversions are undefined in C; only fold the well-defined ones.
        info = np.iinfo(to)
        if not np.all(np.isfinite(x)) or (x.size and (x.min() < info.min or x.max() > info.max)):
            raise _Fallback("float to int out of range")
    if x.dtype.kind in "iu" and to.kind in "iu" and x.size:
        info = np.iinfo(to)
        if x.min() < info.min or x.max() > info.max:
            raise _Fallback("narrowing integer cast")
    return [x.astype(to)]


@_op("Reshape")
def _reshape(node: ir.Node, xs: list, opset: int) -> list:
    x = _need(xs[0])
    if opset < 5:
        shape = list(_attr(node, "shape"))
    else:
        shape = _ints(_need(xs[1]))
    allowzero = _attr(node, "allowzero", 0)
    out = []
    for i, s in enumerate(shape):
        if s == 0 and not allowzero:
            if i >= x.ndim:
                raise _Refuse("0 copies a dim the input lacks")
            out.append(x.shape[i])
        else:
            out.append(s)
    return [np.reshape(x, out)]


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> _Fn:
    def run(node: ir.Node, xs: list, opset: int) -> list:
        a, b = _need(xs[0]), _need(xs[1])
        dt = _same_dtype([a, b], _ARITH)
        return [np.asarray(fn(a, b)).astype(dt)]

    return run


_op("Add")(_binary(np.add))
_op("Sub")(_binary(np.subtract))
_op("Mul")(_binary(np.multiply))


@_op("Div")
def _div(node: ir.Node, xs: list, opset: int) -> list:
    a, b = _need(xs[0]), _need(xs[1])
    dt = _same_dtype([a, b], _ARITH)
    if dt.kind == "f":
        return [np.divide(a, b).astype(dt)]
    if np.any(b == 0):
        raise _Refuse("integer division by zero")
    # ONNX (C++) integer division truncates toward zero; numpy's // floors.
    q = np.abs(a) // np.abs(b)
    return [np.where((a < 0) != (b < 0), -q, q).astype(dt)]


@_op("Pow")
def _pow(node: ir.Node, xs: list, opset: int) -> list:
    a, b = _need(xs[0]), _need(xs[1])
    dt = _same_dtype([a, b], (np.float32, np.float64))
    return [np.power(a, b).astype(dt)]


def _unary(fn: Callable[[np.ndarray], np.ndarray], allowed: tuple[type, ...]) -> _Fn:
    def run(node: ir.Node, xs: list, opset: int) -> list:
        x = _need(xs[0])
        dt = _same_dtype([x], allowed)
        return [np.asarray(fn(x)).astype(dt)]

    return run


_op("Sqrt")(_unary(np.sqrt, (np.float32, np.float64)))
_op("Neg")(_unary(np.negative, (np.int8, np.int16, np.int32, np.int64, np.float32, np.float64)))
_op("Abs")(_unary(np.abs, (*_INTS, np.float32, np.float64)))
_op("Floor")(_unary(np.floor, (np.float32, np.float64)))
_op("Ceil")(_unary(np.ceil, (np.float32, np.float64)))
_op("Not")(_unary(np.logical_not, (np.bool_,)))


def _compare(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], allowed: tuple[type, ...]) -> _Fn:
    def run(node: ir.Node, xs: list, opset: int) -> list:
        a, b = _need(xs[0]), _need(xs[1])
        _same_dtype([a, b], allowed)
        return [np.asarray(fn(a, b)).astype(np.bool_)]

    return run


_NUMERIC = (*_INTS, np.float32, np.float64)
_op("Equal")(_compare(np.equal, (np.bool_, *_NUMERIC)))
_op("Less")(_compare(np.less, _NUMERIC))
_op("Greater")(_compare(np.greater, _NUMERIC))
_op("LessOrEqual")(_compare(np.less_equal, _NUMERIC))
_op("GreaterOrEqual")(_compare(np.greater_equal, _NUMERIC))
_op("And")(_compare(np.logical_and, (np.bool_,)))
_op("Or")(_compare(np.logical_or, (np.bool_,)))
_op("Xor")(_compare(np.logical_xor, (np.bool_,)))


@_op("Where")
def _where(node: ir.Node, xs: list, opset: int) -> list:
    c, a, b = _need(xs[0]), _need(xs[1]), _need(xs[2])
    if c.dtype != np.bool_:
        raise _Fallback("condition dtype")
    dt = _same_dtype([a, b], (np.bool_, *_INTS, *_FLOATS))
    return [np.where(c, a, b).astype(dt)]


@_op("Min", "Max")
def _min_max(node: ir.Node, xs: list, opset: int) -> list:
    arrays = [_need(x) for x in xs]
    # Integers only: NaN handling of the float kernels is not numpy's.
    dt = _same_dtype(arrays, _INTS)
    fn = np.minimum if node.op_type == "Min" else np.maximum
    out = arrays[0]
    for a in arrays[1:]:
        out = fn(out, a)
    return [np.asarray(out).astype(dt)]


@_op("Range")
def _range(node: ir.Node, xs: list, opset: int) -> list:
    start, limit, delta = (_need(x) for x in xs[:3])
    # Integers only: the float kernel accumulates, numpy multiplies, and the last bits differ.
    dt = _same_dtype([start, limit, delta], (np.int16, np.int32, np.int64))
    s, lim, d = int(start), int(limit), int(delta)
    if d == 0:
        raise _Refuse("zero delta")
    n = max(-((s - lim) // d), 0)  # ceil((lim - s) / d) in exact integer arithmetic
    return [(s + d * np.arange(n, dtype=np.int64)).astype(dt)]


@_op("ConstantOfShape")
def _constant_of_shape(node: ir.Node, xs: list, opset: int) -> list:
    shape = _ints(_need(xs[0]))
    if any(s < 0 for s in shape):
        raise _Refuse("negative dim")
    value = _attr(node, "value", None)
    fill = value.numpy().reshape(-1) if value is not None else np.zeros(1, np.float32)
    if fill.size != 1:
        raise _Refuse("value is not one element")
    return [np.full(shape, fill[0], dtype=fill.dtype)]


@_op("Expand")
def _expand(node: ir.Node, xs: list, opset: int) -> list:
    x, shape = _need(xs[0]), _ints(_need(xs[1]))
    out = np.broadcast_shapes(x.shape, tuple(shape))
    return [np.array(np.broadcast_to(x, out))]


@_op("Transpose")
def _transpose(node: ir.Node, xs: list, opset: int) -> list:
    x = _need(xs[0])
    perm = _attr(node, "perm", None)
    return [np.transpose(x, None if perm is None else list(perm))]


@_op("Slice")
def _slice(node: ir.Node, xs: list, opset: int) -> list:
    x = _need(xs[0])
    if opset < 10:
        starts, ends = list(_attr(node, "starts")), list(_attr(node, "ends"))
        axes = _attr(node, "axes", None)
        steps = None
    else:
        starts, ends = _ints(_need(xs[1])), _ints(_need(xs[2]))
        axes = _ints(xs[3]) if len(xs) > 3 else None
        steps = _ints(xs[4]) if len(xs) > 4 else None
    axes = list(range(len(starts))) if axes is None else [a + x.ndim if a < 0 else a for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps) or len(set(axes)) != len(axes):
        raise _Refuse("inconsistent slice operands")
    index: list[slice] = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st == 0 or not 0 <= a < x.ndim:
            raise _Refuse("bad slice")
        if st < 0:
            # onnxruntime reads an INT64_MAX end with a negative step differently from the
            # spec's clamping; let the runtime itself decide.
            raise _Fallback("negative step")
        index[a] = _clamped_slice(s, e, st, x.shape[a])
    return [np.array(x[tuple(index)])]


def _clamped_slice(start: int, end: int, step: int, dim: int) -> slice:
    """ONNX's start/end clamping as a Python slice (whose negative indices mean something else)."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        return slice(start, end, step)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    if dim == 0 or start < 0:
        return slice(0, 0, 1)
    return slice(start, None if end < 0 else end, step)


def _reduce(fn: Callable[..., np.ndarray], input_axes_opset: int) -> _Fn:
    def run(node: ir.Node, xs: list, opset: int) -> list:
        x = _need(xs[0])
        dt = _same_dtype([x], (np.int32, np.int64, np.float32, np.float64))
        keepdims = bool(_attr(node, "keepdims", 1))
        axes = _axes(node, xs, opset, input_axes_opset)
        if not axes:
            if opset >= input_axes_opset and _attr(node, "noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.ndim))
        norm = tuple(a + x.ndim if a < 0 else a for a in axes)
        return [np.asarray(fn(x, axis=norm, keepdims=keepdims)).astype(dt)]

    return run


_op("ReduceProd")(_reduce(np.prod, 18))
_op("ReduceSum")(_reduce(np.sum, 13))
_op("ReduceMin")(_reduce(np.min, 18))
_op("ReduceMax")(_reduce(np.max, 18))
