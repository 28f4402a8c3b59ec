"""Nodes: one operator application, with immutable inputs rewired only through the use lists.

The operator domain has one spelling: the default ONNX domain is ``""`` everywhere in the IR.
``"ai.onnx"`` (its long alias) is stored as ``""`` when a node is built or its domain is set, so
passes compare ``node.domain == ""`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ._attr import Attr
from ._errors import IRError
from ._value import Value

if TYPE_CHECKING:
    from ._graph import Graph, _Anchor

__all__ = ["Node", "normalize_domain"]


def normalize_domain(domain: str) -> str:
    """The IR's spelling of an operator domain: ``"ai.onnx"`` is the default domain ``""``."""
    return "" if domain == "ai.onnx" else domain


class Node:
    """One operator application.

    Args:
        op_type: the operator, e.g. ``"MatMul"``.
        inputs: input values; ``None`` marks an omitted optional input.
        attributes: attributes, as :class:`Attr` objects or a ``{name: python value}`` mapping.
        domain: operator domain (``""`` is the default ONNX domain; ``"ai.onnx"`` is stored as ``""``).
        name: node name.
        num_outputs: number of fresh output values to create when ``outputs`` is not given.
        outputs: output values (fresh, producer-less) or names for them; ``None`` marks an omitted one.
    """

    __slots__ = (
        "op_type", "_domain", "name", "overload", "attributes", "doc_string", "metadata_props",
        "_inputs", "_outputs", "_graph", "_prev", "_next", "__weakref__",
    )

    def __init__(
        self,
        op_type: str,
        inputs: Sequence[Value | None] = (),
        attributes: Iterable[Attr] | dict[str, Any] | None = None,
        *,
        domain: str = "",
        name: str = "",
        num_outputs: int = 1,
        outputs: Sequence[Value | str | None] | None = None,
        overload: str = "",
        doc_string: str = "",
    ) -> None:
        self.op_type = op_type
        self._domain = normalize_domain(domain)
        self.name = name
        self.overload = overload
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = {}
        self.attributes: dict[str, Attr] = {}
        if isinstance(attributes, dict):
            attributes = [Attr.infer(k, v) for k, v in attributes.items()]
        for a in attributes or ():
            self.attributes[a.name] = a
            for g in a.graphs():
                g.parent = self
        self._graph: Graph | None = None
        self._prev: Node | _Anchor | None = None
        self._next: Node | _Anchor | None = None
        self._inputs: tuple[Value | None, ...] = tuple(inputs)
        for i, v in enumerate(self._inputs):
            if v is not None:
                if not isinstance(v, Value):
                    raise IRError(f"node {self.label()}: input {i} is a {type(v).__name__}, not a Value")
                v._uses[(self, i)] = None
        if outputs is None:
            outputs = [Value() for _ in range(num_outputs)]
        outs: list[Value | None] = []
        for i, o in enumerate(outputs):
            if isinstance(o, str):
                o = Value(o)
            if o is not None:
                if o._producer is not None or o._graph is not None:
                    raise IRError(f"node {self.label()}: output value %{o.name} is already defined elsewhere")
                o._producer, o._index = self, i
            outs.append(o)
        self._outputs: tuple[Value | None, ...] = tuple(outs)

    # -- structure ------------------------------------------------------------------------
    @property
    def domain(self) -> str:
        """The operator domain; the default ONNX domain is always ``""`` (never ``"ai.onnx"``)."""
        return self._domain

    @domain.setter
    def domain(self, value: str) -> None:
        self._domain = normalize_domain(value)

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        """Input values (``None`` for an omitted optional input)."""
        return self._inputs

    @property
    def outputs(self) -> tuple[Value | None, ...]:
        """Output values (``None`` for an omitted optional output)."""
        return self._outputs

    @property
    def graph(self) -> Graph | None:
        """The graph this node is in, or ``None`` once erased (or before insertion)."""
        return self._graph

    def label(self) -> str:
        """A short human name for messages: ``Add 'node_name'`` or ``Add -> %out``."""
        op = f"{self._domain}::{self.op_type}" if self._domain else self.op_type
        if self.name:
            return f"{op} {self.name!r}"
        first = next((o for o in self._outputs if o is not None), None)
        return f"{op} -> %{first.name}" if first is not None else op

    def replace_input(self, index: int, value: Value | None) -> None:
        """Make input ``index`` read ``value``; use lists of the old and new value are updated."""
        n = len(self._inputs)
        if not -n <= index < n:
            raise IRError(f"node {self.label()} has {n} inputs; cannot replace input {index}")
        index %= n  # uses are keyed by the non-negative index
        old = self._inputs[index]
        if old is value:
            return
        if old is not None:
            old._uses.pop((self, index), None)
        if value is not None:
            value._uses[(self, index)] = None
        self._inputs = self._inputs[:index] + (value,) + self._inputs[index + 1 :]

    def _detach_inputs(self) -> None:
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.pop((self, i), None)
        # Nodes inside this node's subgraphs read outer values too; once this node is erased those
        # reads are gone, or the outer values would look used forever. Reads of values defined
        # inside the subgraphs stay, so an erased node's body keeps exact use lists of its own.
        for sub in self.subgraphs():
            captured = {id(v) for v in sub.captured_values()}
            for g in sub.all_graphs():
                for n in g:
                    for i, v in enumerate(n._inputs):
                        if v is not None and id(v) in captured:
                            v._uses.pop((n, i), None)

    def _attach_inputs(self) -> None:
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses[(self, i)] = None
        for sub in self.subgraphs():
            for g in sub.all_graphs():
                for n in g:
                    for i, v in enumerate(n._inputs):
                        if v is not None:
                            v._uses[(n, i)] = None

    def attr(self, name: str, default: Any = None) -> Any:
        """The value of attribute ``name``, or ``default`` when absent."""
        a = self.attributes.get(name)
        return default if a is None else a.value

    def set_attr(self, name: str, value: Any) -> None:
        """Set (or replace) an attribute from a Python value."""
        a = Attr.infer(name, value)
        for g in a.graphs():
            g.parent = self
        self.attributes[name] = a

    def subgraphs(self) -> list[Graph]:
        """Graphs held by this node's attributes (If branches, Loop and Scan bodies)."""
        return [g for a in self.attributes.values() for g in a.graphs()]

    def predecessors(self) -> list[Node]:
        """Distinct producers of this node's inputs."""
        return list(dict.fromkeys(p for v in self._inputs if v is not None and (p := v._producer) is not None))

    def successors(self) -> list[Node]:
        """Distinct readers of this node's outputs."""
        return list(dict.fromkeys(n for o in self._outputs if o is not None for n, _ in o._uses))

    def __repr__(self) -> str:
        return f"Node({self.label()})"


