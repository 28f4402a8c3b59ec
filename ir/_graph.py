"""Graphs: inputs, outputs, initializers, and nodes in an ordered linked set.

A graph's ``inputs`` and ``outputs`` are :class:`~ir._value.GraphValues` lists: assign to them,
append, slice-assign or delete as with any list, and every value's ``is_graph_input()`` /
``is_graph_output()`` / ``returned_by()`` stays exact and O(1).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ._dtypes import DataType
from ._errors import IRError
from ._node import Node
from ._tensor import Tensor
from ._types import TensorType
from ._value import GraphValues, Value

__all__ = ["Graph"]


class _Anchor:
    """Sentinel of a graph's circular node list."""

    __slots__ = ("_prev", "_next")

    def __init__(self) -> None:
        self._prev: Any = self
        self._next: Any = self


class Graph:
    """A graph: inputs, outputs, initializers and nodes in topological order.

    Nodes are held in a doubly linked list: insertion and erasure are O(1) and safe while the
    graph is being iterated (erased nodes are skipped; nodes inserted after the cursor are visited).
    """

    __slots__ = (
        "name", "_inputs", "_outputs", "initializers", "doc_string", "metadata_props",
        "parent", "extra", "_anchor", "_len", "_names", "_counter", "__weakref__",
    )

    def __init__(
        self,
        inputs: Sequence[Value] = (),
        outputs: Sequence[Value] = (),
        nodes: Iterable[Node] = (),
        initializers: Iterable[Value] = (),
        *,
        name: str = "",
        doc_string: str = "",
    ) -> None:
        self.name = name
        self.doc_string = doc_string
        self.metadata_props: dict[str, str] = {}
        #: The node whose attribute holds this graph, for subgraphs.
        self.parent: Node | None = None
        #: Opaque fields carried through unchanged (e.g. sparse initializers, quantization annotations).
        self.extra: dict[str, Any] = {}
        self._inputs = GraphValues(self, True)
        self._outputs = GraphValues(self, False, outputs)
        self.initializers: dict[str, Value] = {}
        self._anchor = _Anchor()
        self._len = 0
        self._names: set[str] | None = None
        self._counter = itertools.count()
        for v in inputs:
            self.add_input(v)
        for v in initializers:
            self.add_initializer(v)
        for n in nodes:
            self.append(n)

    # -- values ----------------------------------------------------------------------------
    @property
    def inputs(self) -> GraphValues:
        """The graph inputs, in order (a list; changing it keeps ``is_graph_input()`` exact)."""
        return self._inputs

    @inputs.setter
    def inputs(self, values: Iterable[Value]) -> None:
        self._inputs[:] = list(values)

    @property
    def outputs(self) -> GraphValues:
        """The graph outputs, in order (a list; changing it keeps ``is_graph_output()`` exact)."""
        return self._outputs

    @outputs.setter
    def outputs(self, values: Iterable[Value]) -> None:
        self._outputs[:] = list(values)

    def add_input(self, value: Value) -> Value:
        """Append a graph input."""
        self._inputs.append(value)
        self._note_name(value.name)
        return value

    def _note_name(self, name: str) -> None:
        # Keep unique_name's cache (built lazily on the root graph) in step with new values.
        names = self.root()._names
        if names is not None:
            names.add(name)

    def add_initializer(self, value: Value) -> Value:
        """Register ``value`` (whose ``const_value`` is set) as an initializer."""
        if value.const_value is None:
            raise IRError(f"initializer %{value.name} has no constant value")
        if value._producer is not None:
            raise IRError(f"initializer %{value.name} is produced by node {value._producer.label()}")
        if not value.name:
            value.name = self.unique_name("const")
        existing = self.initializers.get(value.name)
        if existing is not None and existing is not value:
            raise IRError(f"initializer name %{value.name} is already used")
        value._graph = self
        if value.type is None:
            value.type = TensorType(value.const_value.dtype, value.const_value.shape)
        self.initializers[value.name] = value
        self._note_name(value.name)
        return value

    def constant(self, array: Any, *, name: str = "", dtype: DataType | None = None) -> Value:
        """Add a new initializer holding ``array`` and return its value."""
        t = array if isinstance(array, Tensor) else Tensor(array, dtype=dtype)
        v = Value(self.unique_name(name or "const"), TensorType(t.dtype, t.shape), const_value=t)
        return self.root().add_initializer(v) if self.parent is None else self.add_initializer(v)

    def remove_initializer(self, name: str) -> None:
        """Drop an initializer; refuses while nodes still read it."""
        v = self.initializers[name]
        if v.has_uses() or v.is_graph_output():
            raise IRError(f"initializer %{name} is still used; cannot remove it")
        del self.initializers[name]
        if not v.is_graph_input():
            v._graph = None

    def take_initializer(self, value: Value) -> Value:
        """Move initializer ``value`` (the same value, name and uses) from the graph holding it into this one.

        For a subgraph taking a weight only its nodes read (onnxruntime pre-packs a subgraph's own
        initializers only); the caller checks that no reader is left outside this graph.
        """
        home = value._graph
        if home is None or home.initializers.get(value.name) is not value:
            raise IRError(f"%{value.name} is not an initializer")
        if value.is_graph_input() or value.is_graph_output():
            raise IRError(f"initializer %{value.name} is an input or output of its graph; cannot move it")
        if home is self:
            return value
        if value.name in self.initializers:
            raise IRError(f"initializer name %{value.name} is already used in graph {self.name!r}")
        del home.initializers[value.name]
        value._graph = self
        self.initializers[value.name] = value
        return value

    # -- naming ----------------------------------------------------------------------------
    def root(self) -> Graph:
        """The outermost graph (follows subgraph parents)."""
        g = self
        while g.parent is not None and g.parent._graph is not None:
            g = g.parent._graph
        return g

    def unique_name(self, prefix: str) -> str:
        """A value or node name not used anywhere in this model's graph and its subgraphs."""
        root = self.root()
        if root is not self:
            return root.unique_name(prefix)
        if self._names is None:
            names: set[str] = set()
            for g in self.all_graphs():
                names.update(v.name for v in g.inputs)
                names.update(g.initializers)
                for n in g:
                    names.add(n.name)
                    names.update(o.name for o in n.outputs if o is not None)
            self._names = names
        name = prefix
        while name in self._names or not name:
            name = f"{prefix}__{next(self._counter)}"
        self._names.add(name)
        return name

    # -- nodes -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        anchor = self._anchor
        node = anchor._next
        while node is not anchor:
            if node._graph is self:
                yield node
            node = node._next

    def __reversed__(self) -> Iterator[Node]:
        anchor = self._anchor
        node = anchor._prev
        while node is not anchor:
            if node._graph is self:
                yield node
            node = node._prev

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return True

    @property
    def nodes(self) -> list[Node]:
        """A snapshot list of the nodes, in order."""
        return list(self)

    def _link(self, node: Node, after: Node | _Anchor) -> None:
        if node._graph is not None:
            raise IRError(f"node {node.label()} is already in a graph; erase it first")
        node._prev, node._next = after, after._next
        after._next._prev = node
        after._next = node
        node._graph = self
        self._len += 1
        names = self.root()._names
        if names is not None:
            names.add(node.name)
            names.update(o.name for o in node.outputs if o is not None)
        node._attach_inputs()  # idempotent; re-attaches the uses of a node that was erased

    def _holder(self, node: Node) -> Node | None:
        """The node of this graph that is ``node`` or holds it in a subgraph (at any depth)."""
        while node._graph is not self:
            g = node._graph
            if g is None or g.parent is None:
                return None
            node = g.parent
        return node

    def append(self, node: Node) -> Node:
        """Add ``node`` at the end."""
        self._link(node, self._anchor._prev)
        return node

    def insert_before(self, ref: Node, nodes: Node | Iterable[Node]) -> None:
        """Insert ``nodes`` (in order) just before ``ref``."""
        if ref._graph is not self:
            raise IRError(f"node {ref.label()} is not in graph {self.name!r}")
        after = ref._prev
        for n in [nodes] if isinstance(nodes, Node) else list(nodes):
            self._link(n, after)
            after = n

    def insert_after(self, ref: Node, nodes: Node | Iterable[Node]) -> None:
        """Insert ``nodes`` (in order) just after ``ref``."""
        if ref._graph is not self:
            raise IRError(f"node {ref.label()} is not in graph {self.name!r}")
        after: Node = ref
        for n in [nodes] if isinstance(nodes, Node) else list(nodes):
            self._link(n, after)
            after = n

    def erase(self, nodes: Node | Iterable[Node]) -> None:
        """Remove nodes; refuses while an output is still used outside ``nodes`` or is a graph output.

        Uses by nodes inside the subgraphs of ``nodes``, and subgraphs of ``nodes`` returning an
        output, are inside the group and go with it.
        """
        group = [nodes] if isinstance(nodes, Node) else list(nodes)
        members = set(group)
        for n in group:
            if n._graph is not self:
                raise IRError(f"node {n.label()} is not in graph {self.name!r}")
            for o in n._outputs:
                if o is None:
                    continue
                for user, _ in o._uses:
                    if self._holder(user) not in members:
                        raise IRError(
                            f"cannot erase node {n.label()}: its output %{o.name} is still used by {user.label()}"
                        )
                if o.is_graph_output():
                    raise IRError(f"cannot erase node {n.label()}: its output %{o.name} is a graph output")
                for sub in o.returned_by():
                    if sub.parent is None or self._holder(sub.parent) not in members:
                        raise IRError(
                            f"cannot erase node {n.label()}: its output %{o.name} is returned by subgraph "
                            f"{sub.name!r} of {sub.parent.label() if sub.parent else 'a node'}"
                        )
        for n in group:
            n._detach_inputs()
            n._prev._next = n._next
            n._next._prev = n._prev
            n._graph = None
            self._len -= 1

    def move_before(self, ref: Node, node: Node) -> None:
        """Move ``node`` (already in this graph) to just before ``ref``, keeping its uses."""
        for n in (ref, node):
            if n._graph is not self:
                raise IRError(f"node {n.label()} is not in graph {self.name!r}")
        if node is ref:
            return
        node._prev._next = node._next
        node._next._prev = node._prev
        node._graph = None
        self._len -= 1
        after = ref._prev
        node._prev, node._next = after, ref
        after._next = node
        ref._prev = node
        node._graph = self
        self._len += 1

    # -- traversal -------------------------------------------------------------------------
    def all_graphs(self) -> Iterator[Graph]:
        """This graph and every subgraph nested in it, outer first."""
        yield self
        for n in self:
            for sub in n.subgraphs():
                yield from sub.all_graphs()

    def all_nodes(self) -> Iterator[Node]:
        """Every node of this graph and its subgraphs, outer nodes before the subgraphs' nodes."""
        for g in self.all_graphs():
            yield from g

    def captured_values(self) -> list[Value]:
        """Values defined outside this graph (and its subgraphs) that its nodes read."""
        inner: set[int] = set()
        for g in self.all_graphs():
            inner.update(id(v) for v in g.inputs)
            inner.update(id(v) for v in g.initializers.values())
            for n in g:
                inner.update(id(o) for o in n.outputs if o is not None)
        seen: dict[int, Value] = {}
        for g in self.all_graphs():
            for n in g:
                for v in n.inputs:
                    if v is not None and id(v) not in inner:
                        seen.setdefault(id(v), v)
            for v in g.outputs:
                if id(v) not in inner:
                    seen.setdefault(id(v), v)
        return list(seen.values())

    def sort(self) -> None:
        """Reorder the nodes topologically, keeping the current order where it is already valid.

        Raises:
            CycleError: naming a node on a cycle.
        """
        from ._toposort import toposort

        order = toposort(self)
        anchor = self._anchor
        anchor._next = anchor._prev = anchor
        prev: Any = anchor
        for n in order:
            n._prev, n._next = prev, anchor
            prev._next = n
            anchor._prev = n
            prev = n

    def __str__(self) -> str:
        from ._printer import print_graph

        return print_graph(self)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self)} nodes)"


