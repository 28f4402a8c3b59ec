"""Small matching helpers shared by fusion rules: producers, constants, commutative operands.

Matching never mutates the IR.
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
    """True when exactly one node input reads ``value`` and it is not a graph output."""
    return value is not None and len(value.uses()) == 1 and not value.is_graph_output()


def only_users(value: ir.Value, allowed: set[ir.Node]) -> bool:
    """True when every reader of ``value`` is in ``allowed`` and it is not a graph output."""
    return not value.is_graph_output() and all(n in allowed for n, _ in value.uses())
