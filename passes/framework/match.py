"""Matching helpers for rules and pattern checks: producers, constants, operand orders, shapes.

Pattern rules (:mod:`passes.framework.pattern`) need these only in their ``check`` hooks;
hand-written rules walk the graph with them. None of them mutates the IR.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

import ir

__all__ = [
    "producer",
    "const_array",
    "scalar",
    "is_scalar",
    "operands",
    "single_use",
    "only_users",
    "rank",
    "is_channel_param",
    "channel_param_len",
    "noop_cast",
    "is_last_axis_reduce",
]


def producer(value: ir.Value | None, *op_types: str, domain: str = "") -> ir.Node | None:
    """The node producing ``value`` when its op type is one of ``op_types`` (any op when none given)."""
    if value is None:
        return None
    node = value.producer()
    if node is None:
        return None
    if op_types and node.op_type not in op_types:
        return None
    if node.domain != domain:
        return None
    return node


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant data of ``value``: an initializer, or the output of a ``Constant`` node."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain:
        return None
    for key, a in node.attributes.items():
        if key == "value" and isinstance(a.value, ir.Tensor):
            return a.value.numpy()
        if key == "value_float":
            return np.array(a.value, dtype=np.float32)
        if key == "value_floats":
            return np.array(a.value, dtype=np.float32)
        if key == "value_int":
            return np.array(a.value, dtype=np.int64)
        if key == "value_ints":
            return np.array(a.value, dtype=np.int64)
    return None


def scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element constant, else ``None``."""
    arr = const_array(value)
    if arr is None or arr.size != 1 or arr.dtype == object:
        return None
    return float(arr.reshape(-1)[0])


def is_scalar(value: ir.Value | None, expected: float, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    """True when ``value`` is a one-element constant close to ``expected``."""
    s = scalar(value)
    return s is not None and abs(s - expected) <= atol + rtol * abs(expected)


def operands(node: ir.Node) -> Iterator[tuple[ir.Value | None, ir.Value | None]]:
    """Both orders of a commutative binary node's inputs: ``(a, b)`` then ``(b, a)``."""
    a, b = node.inputs[0], node.inputs[1]
    yield a, b
    if a is not b:
        yield b, a


def single_use(value: ir.Value | None) -> bool:
    """True when exactly one node input reads ``value`` and it is neither a graph output nor returned by a subgraph."""
    return (value is not None and len(value.uses()) == 1 and not value.is_graph_output()
            and not value.is_returned_by_subgraph())


def only_users(value: ir.Value, allowed: set[ir.Node]) -> bool:
    """True when every reader of ``value`` is in ``allowed`` and it is neither a graph output nor returned by a subgraph."""
    return (not value.is_graph_output() and not value.is_returned_by_subgraph()
            and all(n in allowed for n, _ in value.uses()))


def rank(value: ir.Value | None) -> int | None:
    """The rank of ``value`` when its shape is known."""
    shape = value.shape if value is not None else None
    return None if shape is None else len(shape)


def is_channel_param(value: ir.Value | None) -> bool:
    """A per-channel parameter (γ, β, a bias): a 1-D constant, or a 1-D value with no producer."""
    if value is None:
        return False
    arr = const_array(value)
    if arr is not None:
        return arr.ndim == 1
    return value.producer() is None and value.shape is not None and len(value.shape) == 1


def channel_param_len(value: ir.Value | None) -> int | None:
    """The length of a per-channel parameter, when known."""
    if value is None:
        return None
    arr = const_array(value)
    if arr is not None:
        return int(arr.size)
    s = value.shape
    return s[0] if s is not None and len(s) == 1 and isinstance(s[0], int) else None


def noop_cast(value: ir.Value | None) -> ir.Node | None:
    """The producer of ``value`` when it is a ``Cast`` to the dtype its input already has."""
    c = producer(value, "Cast")
    if c is None or c.inputs[0] is None or c.inputs[0].dtype is None:
        return None
    return c if int(c.attr("to", -1)) == int(c.inputs[0].dtype) else None


def is_last_axis_reduce(node: ir.Node, input_rank: int | None) -> bool:
    """A ``Reduce*`` over the last axis only, keeping dims (axes as an attribute or an opset-18 input)."""
    if not node.op_type.startswith("Reduce") or node.attr("keepdims", 1) != 1:
        return False
    axes = node.attr("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        axes = None if arr is None else [int(a) for a in arr.reshape(-1)]
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or (input_rank is not None and axes[0] == input_rank - 1)
